// Fused similarity top-k on the CPU: for each query, the k corpus rows of highest q . c (cosine
// with normalize) and their indices, without the B x M score matrix. The ranking arithmetic (one
// int64 key per (score, index), the per-row candidate buffer, the vectorised rejection) is in
// csrc/include/fastpref/similarity_topk_math.h.
//
// What is fused
//   Queries are cut into blocks of RB rows, the corpus into blocks of CB rows. Each (row block,
//   corpus block) pair costs one GEMM (oneDNN for fp32, see cpu_gemm.h) into a reused [RB, CB]
//   buffer, and each row of that tile is merged into the row's running top k while the tile is
//   still in cache (a buffer of 2k candidate keys per row, similarity_topk_math.h). 16-bit
//   inputs are widened to fp32 one corpus block at a time; fp64 runs its GEMM in fp64 and
//   rounds each score to fp32 once. normalize: the queries are L2-normalised
//   (a copy, O(B * D)) and every score is multiplied by 1 / max(|c|, 1e-12) of its corpus row.
//
// Threads
//   at::parallel_for over tasks = row blocks x corpus ranges: with at least as many row blocks as
//   threads a task owns a row block and the whole corpus; with fewer (small B) the corpus is also
//   split and each task keeps its own top k of its rows, merged at the end. The keys are a total
//   order, so the answer does not depend on the split: exact and deterministic.
//
// Memory bound (beyond inputs and outputs)
//   per task an [RB, CB] tile (512 x 256 fp32 = 512 KiB) and, for 16-bit or padded blocks, a
//   [CB, D] corpus block; B x 2k int64 keys per corpus range (1 unless B is small); the queries in
//   fp32 padded by < 64 zero rows, O(B * D); M inverse norms with normalize; the sorted exclusion
//   lists, O(B * P). O(tile + B * (k + D) + M), never O(B * M).

#include "fastpref/similarity_topk_math.h"  // first: it picks the SIMD capability

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fastpref/cpu_gemm.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

namespace fastpref {
namespace {

using similarity_topk::kNoKey;
using similarity_topk::RowTopK;

// Tile: RB query rows x CB corpus rows per GEMM (the fp32 tile of linear_logprobs).
constexpr int64_t RB = 512, CB = 256;
constexpr double kNormEps = 1e-12;  // F.normalize's eps

void check_inputs(const at::Tensor& queries, const at::Tensor& corpus, int64_t k,
                  const std::optional<at::Tensor>& exclude) {
  TORCH_CHECK(queries.dim() == 2, "similarity_topk: queries must be [B, D], got ",
              queries.sizes());
  TORCH_CHECK(corpus.dim() == 2, "similarity_topk: corpus must be [M, D], got ", corpus.sizes());
  TORCH_CHECK(queries.size(1) == corpus.size(1), "similarity_topk: queries ", queries.sizes(),
              " and corpus ", corpus.sizes(), " disagree on D");
  TORCH_CHECK(queries.scalar_type() == corpus.scalar_type(), "similarity_topk: queries (",
              queries.scalar_type(), ") and corpus (", corpus.scalar_type(),
              ") must have the same dtype");
  const auto t = queries.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "similarity_topk: the CPU kernel takes float32, float64, bfloat16 or float16, got ",
              t);
  TORCH_CHECK(queries.device().is_cpu() && corpus.device().is_cpu(),
              "similarity_topk: the CPU kernel needs CPU tensors");
  const int64_t M = corpus.size(0);
  TORCH_CHECK(M < std::numeric_limits<int32_t>::max(), "similarity_topk: corpus has M = ", M,
              " rows; the kernel indexes at most 2^31 - 1");
  TORCH_CHECK(k >= 1 && k <= M, "similarity_topk: k must be in [1, M] = [1, ", M, "], got ", k);
  if (exclude.has_value()) {
    TORCH_CHECK(exclude->dim() == 2 && exclude->size(0) == queries.size(0) &&
                    exclude->scalar_type() == at::kLong && exclude->device().is_cpu(),
                "similarity_topk: exclude must be int64 [B, P] = [", queries.size(0),
                ", P] on the CPU, got ", exclude->scalar_type(), " ", exclude->sizes());
  }
}

// 1 / max(|c_j|, eps) for every corpus row, in acc dtype, a block of rows at a time (so 16-bit
// corpora are never widened whole).
at::Tensor inverse_norms(const at::Tensor& C, at::ScalarType acc) {
  const int64_t M = C.size(0), step = 4096;
  at::Tensor inv = at::empty({M}, C.options().dtype(acc));
  for (int64_t c0 = 0; c0 < M; c0 += step) {
    const int64_t n = std::min(step, M - c0);
    at::Tensor blk = C.narrow(0, c0, n).to(acc);
    at::Tensor norm = at::linalg_vector_norm(blk, 2, {1});
    inv.narrow(0, c0, n).copy_(norm.clamp_min(kNormEps).reciprocal());
  }
  return inv;
}

template <typename acc_t>
void topk_impl(const at::Tensor& Q, const at::Tensor& C, const at::Tensor& inv, int64_t k,
               const at::Tensor& ex_sorted, at::Tensor& scores, at::Tensor& indices) {
  const int64_t B = Q.size(0), D = Q.size(1), M = C.size(0);
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const Gemm gemm(acc);
  const int64_t Bp = gemm.rows_for(B, RB);
  const at::Tensor Qp = Gemm::padded(Q, Bp);  // [Bp, D] acc_t, rows >= B zero
  const int64_t n_rb = (B + RB - 1) / RB, n_cb = (M + CB - 1) / CB;
  const int64_t threads = at::get_num_threads();
  const int64_t S = n_rb >= threads ? 1 : std::min(n_cb, (threads + n_rb - 1) / n_rb);
  const int64_t P = ex_sorted.defined() ? ex_sorted.size(1) : 0;
  const int64_t* ex = P > 0 ? ex_sorted.const_data_ptr<int64_t>() : nullptr;
  const acc_t* inv_p = inv.defined() ? inv.const_data_ptr<acc_t>() : nullptr;
  // keys[s, b, 0..size[s, b]): the candidates of row b in corpus range s, all > thr[s, b]
  std::vector<int64_t> keys(S * B * 2 * k), size(S * B, 0), thr(S * B, kNoKey);
  const bool widen = C.scalar_type() != acc;

  at::parallel_for(0, n_rb * S, 1, [&](int64_t task_begin, int64_t task_end) {
    at::Tensor zt = at::empty({std::min(RB, Bp) * std::min(CB, gemm.rows_for(M, CB))},
                              Q.options());
    at::Tensor cbuf;  // a widened or padded corpus block
    std::vector<float> row(std::is_same_v<acc_t, float> ? 0 : CB);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t rb = task / S, s = task % S;
      const int64_t r0 = rb * RB, nb = std::min(RB, B - r0), nbp = std::min(RB, Bp - r0);
      const at::Tensor q_blk = Qp.narrow(0, r0, nbp);
      for (int64_t cb = s * n_cb / S; cb < (s + 1) * n_cb / S; ++cb) {
        const int64_t c0 = cb * CB, nc = std::min(CB, M - c0);
        const int64_t ncp = c0 + CB <= M ? CB : gemm.rows_for(nc, CB);
        at::Tensor c_blk = C.narrow(0, c0, nc);
        if (widen || ncp != nc) {
          // rows past nc keep an earlier block's (finite) rows: their columns are never read
          if (!cbuf.defined()) cbuf = at::zeros({CB, D}, Q.options());
          cbuf.narrow(0, 0, nc).copy_(c_blk);
          c_blk = cbuf.narrow(0, 0, ncp);
        }
        at::Tensor z = zt.narrow(0, 0, nbp * ncp).view({nbp, ncp});
        gemm(z, q_blk, c_blk.t());  // [nbp, ncp] scores; padding rows/columns unused
        acc_t* zp = z.data_ptr<acc_t>();
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t r = r0 + i;
          acc_t* zr = zp + i * ncp;
          const float* sr;
          if constexpr (std::is_same_v<acc_t, float>) {
            if (inv_p) {
              for (int64_t j = 0; j < nc; ++j) zr[j] *= inv_p[c0 + j];
            }
            sr = zr;
          } else {  // fp64 GEMM: round each score to fp32 once
            for (int64_t j = 0; j < nc; ++j) row[j] = float(inv_p ? zr[j] * inv_p[c0 + j] : zr[j]);
            sr = row.data();
          }
          const int64_t at = s * B + r;
          RowTopK row_k{keys.data() + at * 2 * k, size[at], thr[at], k};
          row_k.offer(sr, nc, c0, ex ? ex + r * P : nullptr, P);
        }
      }
    }
  });

  float* out_s = scores.data_ptr<float>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t b_begin, int64_t b_end) {
    std::vector<int64_t> all;
    for (int64_t r = b_begin; r < b_end; ++r) {
      const int64_t* best = nullptr;
      int64_t n = 0;
      if (S == 1) {
        int64_t* ks = keys.data() + r * 2 * k;
        n = RowTopK{ks, size[r], thr[r], k}.finish();
        best = ks;
      } else {  // the corpus ranges' candidates together: their k best
        all.clear();
        for (int64_t s = 0; s < S; ++s) {
          const int64_t* ks = keys.data() + (s * B + r) * 2 * k;
          all.insert(all.end(), ks, ks + size[s * B + r]);
        }
        n = std::min<int64_t>(k, all.size());
        std::partial_sort(all.begin(), all.begin() + n, all.end(), std::greater<int64_t>());
        best = all.data();
      }
      for (int64_t j = 0; j < k; ++j) {  // fewer than k candidates: -inf scores, index -1
        const int64_t key = j < n ? best[j] : kNoKey;
        out_s[r * k + j] = similarity_topk::score_of(key);
        out_i[r * k + j] = similarity_topk::index_of(key);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> similarity_topk_cpu(const at::Tensor& queries,
                                                       const at::Tensor& corpus, int64_t k,
                                                       const std::optional<at::Tensor>& exclude,
                                                       bool normalize) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // a raw kernel, no gradient
  check_inputs(queries, corpus, k, exclude);
  const int64_t B = queries.size(0);
  const auto acc = queries.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor scores = at::empty({B, k}, queries.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({B, k}, queries.options().dtype(at::kLong));
  if (B == 0) return {scores, indices};
  at::Tensor Q = queries.detach().to(acc).contiguous(), C = corpus.detach().contiguous();
  at::Tensor inv;
  if (normalize) {
    Q = Q / at::linalg_vector_norm(Q, 2, {1}, /*keepdim=*/true).clamp_min(kNormEps);
    inv = inverse_norms(C, acc);
  }
  at::Tensor ex_sorted;  // each row's exclusions ascending (-1 padding first, never matched)
  if (exclude.has_value() && exclude->size(1) > 0) {
    ex_sorted = std::get<0>(exclude->detach().sort(1)).contiguous();
  }
  if (acc == at::kDouble) {
    topk_impl<double>(Q, C, inv, k, ex_sorted, scores, indices);
  } else {
    topk_impl<float>(Q, C, inv, k, ex_sorted, scores, indices);
  }
  return {scores, indices};
}

}  // namespace
}  // namespace fastpref

TORCH_LIBRARY_FRAGMENT(fastpref_C, m) {
  m.def(
      "similarity_topk(Tensor queries, Tensor corpus, int k, Tensor? exclude, bool normalize) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastpref_C, CPU, m) {
  m.impl("similarity_topk", &fastpref::similarity_topk_cpu);
}
