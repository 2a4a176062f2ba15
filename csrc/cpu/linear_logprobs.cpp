// Fused linear log-probs on the CPU: log p(target) and the entropy of softmax(f(H @ W.T + b))
// without the N x V logits. This file holds the launchers (tiling, GEMMs, threads, memory); the
// per-row math (logit map f, online log-sum-exp, logit gradient) and why it is numerically safe
// are in csrc/include/fastpref/linear_logprobs_math.h.
//
// What is fused
//   forward:  lse = logsumexp_v f,  logp = f[target] - lse,  entropy = lse - sum_v p_v f_v
//   backward: G = dL/dz recomputed tile by tile, then dH = G @ W, dW = G.T @ H, db = sum_rows G.
//   Four GEMMs: the logits, their recompute, dH, dW. Three when the caller gives the forward a
//   logits_budget the kept rows' raw logits fit (see KeptLogits): the forward's GEMM writes each
//   tile into one kept buffer instead of the reused tile, and the backward reads it back instead
//   of recomputing: the same GEMM on the same shapes, so the gradients are bit for bit the same.
//   The rows arrive compacted (ignored targets removed by the ops layer, which also checked every
//   target once), so no GEMM is spent on an ignored row.
//
// How it is tiled
//   The vocabulary is cut into tiles of VT columns and the tiles into one contiguous range per
//   thread (at::parallel_for, one task per thread). A task loops over its vocab tiles and, inside,
//   over blocks of NB rows; each (row block, vocab tile) pair costs one GEMM (oneDNN for fp32
//   and bf16, see Gemm below) into a reused [NB, VT] buffer, followed by a vectorised
//   epilogue (at::vec::Vectorized) over that buffer while it is still in cache. In the backward
//   the one recomputed tile of G feeds both dH_rows += G @ W_tile and dW_tile += G.T @ H_rows.
//   A task owns its vocab range, so dW and db need no synchronisation; dH is summed over the
//   vocabulary, so each task accumulates its own [N, D] fp32 partial and the partials are added
//   in task order at the end. No atomics, fixed summation order: bitwise reproducible for a
//   given thread count. Per-task online states are merged in task order.
//
// Denormals
//   Wide logits (std ~20) make most exp() results underflow, and a denormal float costs ~100
//   cycles of microcode assist per operation on x86: every worker thread runs with FTZ/DAZ set
//   (restored on exit). bf16 GEMMs accumulate in fp32 inside oneDNN; the epilogue is fp32, dH
//   and dW are accumulated in fp32 and rounded to bf16 once at the end.
//
// Memory bound (beyond inputs and outputs)
//   per task: one [NB, VT] logits tile in the input dtype (fp32: 512 x 256; bf16: 1024 x 512,
//   and its gradient tile, each row widened to fp32 in a one-row buffer), for bf16 with more
//   than NB rows a [VT, D] fp32 dW accumulator, an [N, D] fp32 dH partial (all but the first
//   task for unpadded fp32; all for bf16) and 3 x N fp32 of row state; where the GEMMs go to
//   oneDNN, a copy of H padded by < 64 zero rows (see Gemm): O(tile + N * D), never O(N * V)
//   -- unless the caller asked for the kept logits, which are exactly the (N + < 64 padding
//   rows) x V GEMM outputs in the input dtype, and only when they fit the budget it gave.

// The per-row math (logit map, online log-sum-exp, logit gradient) is in
// csrc/include/fastpref/linear_logprobs_math.h, included first: it picks the SIMD capability.
#include "fastpref/linear_logprobs_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fastpref/cpu_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define FASTPREF_HAS_MXCSR 1
#endif

namespace fastpref {
namespace {

using linear_logprobs::grad_row;
using linear_logprobs::LogitMap;
using linear_logprobs::lse_update;
using linear_logprobs::make_logit_map;
using linear_logprobs::map_row_max;
using linear_logprobs::merge_states;

// Tile sizes: NB rows x VT vocab columns per GEMM. fp32: a 512 KiB logits tile that stays in a
// Zen 4 / Xeon L2 next to MKL's packed panels. bf16: the tile products come back from oneDNN in
// bf16 and are added into fp32 accumulators, one extra pass per tile, so the tiles are larger
// (fewer passes) and 1024 rows make dW a single GEMM for the usual <= 1024 kept rows.
template <typename scalar_t>
struct Tiles {
  static constexpr int64_t NB = 512, VT = 256;
};
template <>
struct Tiles<at::BFloat16> {
  static constexpr int64_t NB = 1024, VT = 512;
};
// Flush-to-zero + denormals-are-zero for the current thread, restored on scope exit.
struct DenormalsAreZero {
#ifdef FASTPREF_HAS_MXCSR
  unsigned int saved;
  DenormalsAreZero() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~DenormalsAreZero() { _mm_setcsr(saved); }
#endif
};

// Row i of a GEMM output tile as acc_t: the tile's own row when they match, else that row
// widened into buf (one row, still in L1 for the row's math). Widening the whole tile first, as
// the kernel did, wrote a bf16 [1024, 512] tile out as 2 MiB of fp32 -- twice a Zen 4 core's L2
// -- and read it back from L3 a pass later. The same conversion, so the same values.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as_acc(const scalar_t* tile, int64_t i, int64_t vt, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return tile + i * vt;
  } else {
    at::vec::convert(tile + i * vt, buf, vt);
    return buf;
  }
}

// The kept logits of the three-GEMM path: the raw GEMM tiles z = H @ W_tile.T (input dtype, before
// bias and logit map) in one flat buffer, vocab tile by vocab tile: tile [v0, v0 + vt) is a
// row-major [rows, vt] block at offset rows * v0, and its row block r0 the contiguous
// [nbp, vt] at + r0 * vt, so a tile GEMM writes straight into it. rows pads the last row block
// to a multiple of 64 whatever Gemm pads (its widest), so the layout does not depend on the GEMM
// library, which FASTPREF_CPU_GEMM could change between the forward and the backward.
struct KeptLogits {
  static int64_t rows(int64_t N, int64_t NB) {
    const int64_t full = N / NB * NB, rest = N - full;
    return full + (rest + 63) / 64 * 64;
  }
  template <typename scalar_t>
  static int64_t bytes(int64_t N, int64_t V) {
    return rows(N, Tiles<scalar_t>::NB) * V * static_cast<int64_t>(sizeof(scalar_t));
  }
};

// A large output buffer (the kept logits, dW) on transparent huge pages where the kernel allows
// them by madvise, recycled from call to call. A fresh buffer pays for every page on first touch:
// one fault per 4 KiB page (measured: ~30 ms for the 130 MB of kept fp32 logits at N 1015,
// V 32000, ~125 ms at V 128256, on a 2-core Zen 5), 2 MiB pages ~5x less there -- but on the
// 2-core Zen 4 VM the first touch of a fresh 501 MiB THP buffer took 0.29-0.35 s against 0.022 s
// to rewrite it (the hypervisor backs each new page), more than the GEMM the kept logits save.
// So a freed buffer goes back to a small pool (LargePool) and the next call of a similar size
// takes it, already resident: a training step allocates the same few sizes every step. Small
// buffers, or other systems, get at::empty.
#if defined(__linux__) && defined(MADV_HUGEPAGE)
class LargePool {
 public:
  static constexpr size_t kHuge = size_t(2) << 20;
  static constexpr size_t kMaxFree = 4;                 // free blocks kept
  static constexpr size_t kMaxFreeBytes = size_t(2) << 30;  // and their total
  // A block of at least `bytes` (rounded to 2 MiB): the smallest free one that is no more than
  // 1.5x the request, else a new one; nullptr if the allocation fails. `*size` is its size.
  static void* take(size_t bytes, size_t* size) {
    const size_t want = (bytes + kHuge - 1) / kHuge * kHuge;
    {
      std::lock_guard<std::mutex> lock(mutex());
      auto& free = blocks();
      auto best = free.end();
      for (auto it = free.begin(); it != free.end(); ++it) {
        if (it->second >= want && it->second <= want + want / 2 &&
            (best == free.end() || it->second < best->second)) {
          best = it;
        }
      }
      if (best != free.end()) {
        void* p = best->first;
        *size = best->second;
        free.erase(best);
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, want) != 0) return nullptr;
    madvise(p, want, MADV_HUGEPAGE);  // advice only: on failure the pages stay 4 KiB
    *size = want;
    return p;
  }
  // Returns a block: kept for reuse while the pool is under its bounds, else freed (the oldest
  // free block gives way to a new one, so a run whose sizes change keeps its recent ones).
  static void give(void* p, size_t size) {
    std::lock_guard<std::mutex> lock(mutex());
    auto& free = blocks();
    if (size > kMaxFreeBytes) {
      std::free(p);
      return;
    }
    free.emplace_back(p, size);
    size_t total = 0;
    for (const auto& b : free) total += b.second;
    while (free.size() > kMaxFree || total > kMaxFreeBytes) {
      total -= free.front().second;
      std::free(free.front().first);
      free.erase(free.begin());
    }
  }
  // Frees every pooled block (the memory goes back to the system); returns the bytes freed.
  static int64_t release() {
    std::lock_guard<std::mutex> lock(mutex());
    int64_t bytes = 0;
    for (const auto& b : blocks()) {
      bytes += static_cast<int64_t>(b.second);
      std::free(b.first);
    }
    blocks().clear();
    return bytes;
  }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::pair<void*, size_t>>& blocks() {
    static auto* b = new std::vector<std::pair<void*, size_t>>();  // never destroyed: a tensor
    return *b;                                                     // may die after main's exit
  }
};
#endif

at::Tensor empty_large(int64_t numel, const at::TensorOptions& opts) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(opts.dtype().toScalarType());
  if (bytes >= 2 * LargePool::kHuge) {
    size_t size = 0;
    if (void* p = LargePool::take(bytes, &size)) {
      return at::from_blob(
          p, {numel}, [size](void* q) { LargePool::give(q, size); }, opts);
    }
  }
#endif
  return at::empty({numel}, opts);
}

int64_t release_large_buffers() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  return LargePool::release();
#else
  return 0;
#endif
}

struct Plan {
  int64_t N, D, V, ntiles, ntasks;
  int64_t tile_begin(int64_t task) const { return task * ntiles / ntasks; }
};

Plan make_plan(int64_t N, int64_t D, int64_t V, int64_t VT) {
  Plan p{N, D, V, (V + VT - 1) / VT, 1};
  p.ntasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.ntiles));
  return p;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.dim() == 2, "linear_logprobs: hidden must be [N, D], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "linear_logprobs: weight must be [V, D], got ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "linear_logprobs: hidden ", hidden.sizes(),
              " and weight ", weight.sizes(), " disagree on D");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "linear_logprobs: hidden (",
              hidden.scalar_type(), ") and weight (", weight.scalar_type(),
              ") must have the same dtype");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16 ||
                  hidden.scalar_type() == at::kDouble,
              "linear_logprobs: the CPU kernel takes float32, bfloat16 or float64, got ",
              hidden.scalar_type());
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "linear_logprobs: the CPU kernel needs CPU tensors");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) &&
                  targets.scalar_type() == at::kLong,
              "linear_logprobs: targets must be int64 [N] = [", hidden.size(0), "], got ",
              targets.scalar_type(), " ", targets.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "linear_logprobs: bias must be [V] = [", weight.size(0), "], got ",
                bias->sizes());
  }
}

// The per-element range scan, for callers that come past the ops layer (fastpref.ops scans once,
// at the original row positions, and passes check_targets=false). Either way the kernels only
// compare targets with their tile's column range and never use one as an address: a target
// outside [0, V) reads nothing (its row's logp is NaN), so skipping the scan cannot read out of
// bounds.
void check_target_range(const at::Tensor& targets, int64_t V) {
  const int64_t* t = targets.const_data_ptr<int64_t>();  // caller made it contiguous
  for (int64_t i = 0; i < targets.size(0); ++i) {
    TORCH_CHECK(t[i] >= 0 && t[i] < V, "linear_logprobs: targets[", i, "] = ", t[i],
                " is outside [0, ", V, ")");
  }
}

template <typename acc_t>
LogitMap<acc_t> make_map(double temperature, double softcap) {
  TORCH_CHECK(temperature > 0, "linear_logprobs: temperature must be > 0, got ", temperature);
  TORCH_CHECK(softcap >= 0, "linear_logprobs: softcap must be > 0 (0 = off), got ", softcap);
  return make_logit_map<acc_t>(temperature, softcap);
}

// Column of target y inside the vocab tile [v0, v0 + vt), or -1 (no subtraction that overflows).
inline int64_t tile_column(int64_t y, int64_t v0, int64_t vt) {
  return (y >= v0 && y < v0 + vt) ? y - v0 : -1;
}

template <typename scalar_t, typename acc_t>
void forward_impl(const at::Tensor& H, const at::Tensor& W, const at::Tensor& tgt,
                  const at::Tensor& bias, const LogitMap<acc_t>& o, bool entropy,
                  at::Tensor& logp, at::Tensor& lse, at::Tensor& ent, at::Tensor& kept) {
  constexpr int64_t kRowBlock = Tiles<scalar_t>::NB, kVocabTile = Tiles<scalar_t>::VT;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const Plan plan = make_plan(H.size(0), H.size(1), W.size(0), kVocabTile);
  const int64_t N = plan.N, V = plan.V, P = plan.ntasks;
  const int64_t Nk = KeptLogits::rows(N, kRowBlock);  // used when kept.defined()
  const auto acc_opts = H.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // per task row state: m, s, a
  at::Tensor state = at::empty({P, 3, N}, acc_opts);
  // mapped target logit, written by the task that owns the target's tile (NaN: no tile does)
  at::Tensor tgt_f = at::full({N}, std::numeric_limits<acc_t>::quiet_NaN(), acc_opts);
  const int64_t* t = tgt.const_data_ptr<int64_t>();
  const acc_t* b = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  acc_t* tf = tgt_f.data_ptr<acc_t>();
  const Gemm gemm(H.scalar_type());
  const int64_t Np = gemm.rows_for(N, kRowBlock);
  const at::Tensor Hp = Gemm::padded(H, Np);  // [Np, D], rows >= N zero

  at::parallel_for(0, P, 1, [&](int64_t task_begin, int64_t task_end) {
    DenormalsAreZero daz;
    const int64_t tile_elems = std::min(kRowBlock, Np) * std::min(kVocabTile, V);
    at::Tensor zt = at::empty({tile_elems}, H.options());
    std::vector<acc_t> widened(same ? 0 : kVocabTile);  // one row of a bf16 tile, as fp32
    for (int64_t task = task_begin; task < task_end; ++task) {
      acc_t* st = state.data_ptr<acc_t>() + task * 3 * N;
      acc_t *m = st, *s = st + N, *a = st + 2 * N;
      std::fill(m, m + N, -std::numeric_limits<acc_t>::infinity());
      std::fill(s, s + 2 * N, acc_t(0));
      for (int64_t tile = plan.tile_begin(task); tile < plan.tile_begin(task + 1); ++tile) {
        const int64_t v0 = tile * kVocabTile, vt = std::min(kVocabTile, V - v0);
        at::Tensor w_tile = W.narrow(0, v0, vt);
        for (int64_t r0 = 0; r0 < N; r0 += kRowBlock) {
          const int64_t nb = std::min(kRowBlock, N - r0), nbp = std::min(kRowBlock, Np - r0);
          at::Tensor z = (kept.defined() ? kept.narrow(0, Nk * v0 + r0 * vt, nbp * vt)
                                         : zt.narrow(0, 0, nbp * vt))
                             .view({nbp, vt});
          gemm(z, Hp.narrow(0, r0, nbp), w_tile.t());  // [nbp, vt]; rows >= nb are padding
          if (kept.defined() && r0 + nbp < Nk && r0 + kRowBlock >= N) {
            // the kept layout pads to 64 rows where MKL's GEMM pads none: zero the rest, so
            // the returned buffer holds no uninitialised memory
            scalar_t* rest = kept.data_ptr<scalar_t>() + Nk * v0 + (r0 + nbp) * vt;
            std::fill(rest, rest + (Nk - r0 - nbp) * vt, scalar_t(0));
          }
          // the mapped logits f go to the scratch tile (in place unless z is the kept buffer)
          // for fp32, to the widened row for bf16
          const scalar_t* zs = z.const_data_ptr<scalar_t>();
          for (int64_t i = 0; i < nb; ++i) {
            const int64_t r = r0 + i;
            const acc_t* zrow = row_as_acc(zs, i, vt, widened.data());
            acc_t* row;
            if constexpr (same) {
              row = zt.data_ptr<acc_t>() + i * vt;
            } else {
              row = widened.data();
            }
            acc_t tmax = map_row_max(zrow, row, b ? b + v0 : nullptr, vt, o);
            const int64_t c = tile_column(t[r], v0, vt);
            if (c >= 0) tf[r] = row[c];
            lse_update(row, vt, tmax, entropy, m[r], s[r], a[r]);
          }
        }
      }
    }
  });

  // merge the task states in task order
  const acc_t* st = state.const_data_ptr<acc_t>();
  acc_t* lp = logp.data_ptr<acc_t>();
  acc_t* ls = lse.data_ptr<acc_t>();
  acc_t* en = entropy ? ent.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, N, 2048, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const acc_t L = merge_states(st + r, 3 * N, N, P, en ? en + r : nullptr);
      ls[r] = L;
      lp[r] = tf[r] - L;
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_impl(const at::Tensor& H, const at::Tensor& W, const at::Tensor& tgt,
                   const at::Tensor& bias, const LogitMap<acc_t>& o, const at::Tensor& g_logp,
                   const at::Tensor& g_ent, const at::Tensor& lse, const at::Tensor& ent,
                   const at::Tensor& kept, at::Tensor& dH, at::Tensor& dW, at::Tensor& db) {
  constexpr int64_t kRowBlock = Tiles<scalar_t>::NB, kVocabTile = Tiles<scalar_t>::VT;
  const Plan plan = make_plan(H.size(0), H.size(1), W.size(0), kVocabTile);
  const int64_t N = plan.N, D = plan.D, V = plan.V, P = plan.ntasks;
  const int64_t Nk = KeptLogits::rows(N, kRowBlock);  // used when kept.defined()
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const auto acc_opts = H.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool need_h = dH.defined(), need_w = dW.defined(), need_b = db.defined();
  const bool entropy = g_ent.defined();
  const Gemm gemm(H.scalar_type());
  const int64_t Np = gemm.rows_for(N, kRowBlock);
  const at::Tensor Hp = Gemm::padded(H, Np);  // [Np, D], rows >= N zero
  // dH partials ([Np, D] each): task 0 writes straight into dH when it is acc_t and unpadded.
  const bool in_place = same && Np == N;
  at::Tensor dh_part;
  if (need_h) dh_part = at::zeros({in_place ? P - 1 : P, Np, D}, acc_opts);
  auto dh_of = [&](int64_t task) -> at::Tensor {
    if (in_place) return task == 0 ? dH : dh_part[task - 1];
    return dh_part[task];
  };
  if (need_h && in_place) dH.zero_();
  const int64_t* t = tgt.const_data_ptr<int64_t>();
  const acc_t* b = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  const acc_t* gl = g_logp.defined() ? g_logp.const_data_ptr<acc_t>() : nullptr;
  const acc_t* ge = entropy ? g_ent.const_data_ptr<acc_t>() : nullptr;
  const acc_t* ls = lse.const_data_ptr<acc_t>();
  const acc_t* en = entropy ? ent.const_data_ptr<acc_t>() : nullptr;
  acc_t* dbp = need_b ? db.data_ptr<acc_t>() : nullptr;
  const bool multi_block = N > kRowBlock;

  at::parallel_for(0, P, 1, [&](int64_t task_begin, int64_t task_end) {
    DenormalsAreZero daz;
    const int64_t tile_elems = std::min(kRowBlock, Np) * std::min(kVocabTile, V);
    at::Tensor zt = at::empty({tile_elems}, H.options());
    at::Tensor gt = same ? zt : at::empty({tile_elems}, H.options());
    std::vector<acc_t> scratch(same ? 0 : kVocabTile), widened(same ? 0 : kVocabTile);
    at::Tensor dw_acc, dw_tmp, dh_tmp;
    if (!same && need_w && multi_block) {
      dw_acc = at::empty({std::min(kVocabTile, V), D}, acc_opts);
      dw_tmp = at::empty({std::min(kVocabTile, V), D}, H.options());
    }
    if (!same && need_h) dh_tmp = at::empty({std::min(kRowBlock, Np), D}, H.options());
    for (int64_t task = task_begin; task < task_end; ++task) {
      at::Tensor dh = need_h ? dh_of(task) : at::Tensor();
      for (int64_t tile = plan.tile_begin(task); tile < plan.tile_begin(task + 1); ++tile) {
        const int64_t v0 = tile * kVocabTile, vt = std::min(kVocabTile, V - v0);
        at::Tensor w_tile = W.narrow(0, v0, vt);
        at::Tensor dw_tile = need_w ? dW.narrow(0, v0, vt) : at::Tensor();
        for (int64_t r0 = 0; r0 < N; r0 += kRowBlock) {
          const int64_t nb = std::min(kRowBlock, N - r0), nbp = std::min(kRowBlock, Np - r0);
          at::Tensor h_blk = Hp.narrow(0, r0, nbp);
          at::Tensor z;
          if (kept.defined()) {  // the forward's tile (the grad tile below is the other buffer)
            z = kept.narrow(0, Nk * v0 + r0 * vt, nbp * vt).view({nbp, vt});
          } else {
            z = zt.narrow(0, 0, nbp * vt).view({nbp, vt});
            gemm(z, h_blk, w_tile.t());  // recompute the logits tile
          }
          const scalar_t* zs = z.const_data_ptr<scalar_t>();
          at::Tensor g = gt.narrow(0, 0, nbp * vt).view({nbp, vt});
          scalar_t* gp = g.data_ptr<scalar_t>();
          // padding rows: zero gradient, so they add nothing to dW (their dH rows are dropped)
          std::fill(gp + nb * vt, gp + nbp * vt, scalar_t(0));
          for (int64_t i = 0; i < nb; ++i) {
            const int64_t r = r0 + i;
            const acc_t lser = ls[r];
            grad_row<scalar_t, acc_t>(row_as_acc(zs, i, vt, widened.data()),
                                      b ? b + v0 : nullptr, vt, o,
                                      tile_column(t[r], v0, vt), gl ? gl[r] : acc_t(0),
                                      entropy ? ge[r] : acc_t(0), lser,
                                      entropy ? lser - en[r] : acc_t(0), entropy,
                                      gp + i * vt, dbp ? dbp + v0 : nullptr, scratch.data());
          }
          if (need_h) {
            at::Tensor dh_blk = dh.narrow(0, r0, nbp);
            if constexpr (same) {
              gemm(dh_blk, g, w_tile, /*accumulate=*/true);  // [nbp, D] += [nbp, vt] @ [vt, D]
            } else {
              at::Tensor tmp = dh_tmp.narrow(0, 0, nbp);
              at::mm_out(tmp, g, w_tile);
              dh_blk.add_(tmp);  // fp32 accumulation of the bf16 tile product
            }
          }
          if (need_w) {
            if constexpr (same) {
              gemm(dw_tile, g.t(), h_blk, /*accumulate=*/r0 > 0);  // [vt, D] = [vt, nbp] @ [nbp, D]
            } else if (!multi_block) {
              at::mm_out(dw_tile, g.t(), h_blk);  // one GEMM, fp32 inside, one rounding
            } else {
              at::Tensor tmp = dw_tmp.narrow(0, 0, vt);
              at::mm_out(tmp, g.t(), h_blk);
              at::Tensor acc = dw_acc.narrow(0, 0, vt);
              if (r0 == 0) {
                acc.copy_(tmp);
              } else {
                acc.add_(tmp);
              }
            }
          }
        }
        if constexpr (!same) {
          if (need_w && multi_block) dw_tile.copy_(dw_acc.narrow(0, 0, vt));
        }
      }
    }
  });

  if (need_h) {
    // sum the partials in task order, rows in parallel
    at::parallel_for(0, N, 64, [&](int64_t r_begin, int64_t r_end) {
      const int64_t nr = r_end - r_begin;
      if (in_place) {
        at::Tensor out = dH.narrow(0, r_begin, nr);
        for (int64_t p = 0; p + 1 < P; ++p) out.add_(dh_part[p].narrow(0, r_begin, nr));
      } else {
        at::Tensor sum = dh_part[0].narrow(0, r_begin, nr).clone();
        for (int64_t p = 1; p < P; ++p) sum.add_(dh_part[p].narrow(0, r_begin, nr));
        dH.narrow(0, r_begin, nr).copy_(sum);  // (rows >= N, the padding, are dropped)
      }
    });
  }
}

}  // namespace

std::string cpu_fp32_gemm() { return Gemm(at::kFloat).onednn ? "onednn" : "mkl"; }
bool cpu_onednn_available() { return onednn_available(); }

namespace {
// out = a @ b through the kernels' tile GEMM (Gemm: oneDNN for fp32 and bf16 where available),
// on whole matrices: the benchmarks' "four GEMMs of the op's shapes" in the library the op uses.
void cpu_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "cpu_mm: a ", a.sizes(),
              " and b ", b.sizes(), " do not multiply");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == a.size(0) && out.size(1) == b.size(1) &&
                  out.is_contiguous(),
              "cpu_mm: out must be contiguous [", a.size(0), ", ", b.size(1), "], got ",
              out.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.scalar_type() == out.scalar_type() &&
                  a.device().is_cpu() && b.device().is_cpu() && out.device().is_cpu(),
              "cpu_mm: a, b and out must be CPU tensors of one dtype");
  at::Tensor o = out;
  Gemm(a.scalar_type())(o, a, b);
}
}  // namespace

namespace {

std::optional<at::Tensor> opt(const at::Tensor& x) {
  return x.defined() ? std::optional<at::Tensor>(x) : std::nullopt;
}

at::Tensor as_acc(const std::optional<at::Tensor>& x, at::ScalarType acc) {
  if (!x.has_value() || !x->defined()) return at::Tensor();
  return x->detach().to(acc).contiguous();
}

// logits_budget: bytes the kept logits may take (0: never keep them); the fourth output is the
// kept buffer (see KeptLogits) when they fit, else an empty [0] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, double temperature, double softcap, bool with_entropy,
    bool check_targets, int64_t logits_budget) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // a raw kernel: autograd lives in Python
  at::Tensor tgt = targets.contiguous();
  check_inputs(hidden, weight, tgt, bias);
  if (check_targets) check_target_range(tgt, weight.size(0));
  at::Tensor H = hidden.detach().contiguous(), W = weight.detach().contiguous();
  const auto acc = H.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = H.size(0);
  at::Tensor logp = at::empty({N}, H.options().dtype(acc));
  at::Tensor lse = at::empty({N}, H.options().dtype(acc));
  at::Tensor ent = at::empty({with_entropy ? N : 0}, H.options().dtype(acc));
  at::Tensor none = at::empty({0}, H.options());
  if (N == 0) return {logp, lse, ent, none};
  at::Tensor b = as_acc(bias, acc);
  at::Tensor kept;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, H.scalar_type(), "linear_logprobs_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int64_t need = KeptLogits::bytes<scalar_t>(N, W.size(0));
    if (logits_budget > 0 && need <= logits_budget) {
      kept = empty_large(need / static_cast<int64_t>(sizeof(scalar_t)), H.options());
    }
    forward_impl<scalar_t, acc_t>(H, W, tgt, b, make_map<acc_t>(temperature, softcap),
                                  with_entropy, logp, lse, ent, kept);
  });
  return {logp, lse, ent, kept.defined() ? kept : none};
}

using OptTensor = std::optional<at::Tensor>;

std::tuple<OptTensor, OptTensor, OptTensor> linear_logprobs_bwd(
    const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    const std::optional<at::Tensor>& entropy, double temperature, double softcap,
    bool need_hidden, bool need_weight, bool need_bias, bool check_targets,
    const std::optional<at::Tensor>& logits) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  at::Tensor tgt = targets.contiguous();
  check_inputs(hidden, weight, tgt, bias);
  if (check_targets) check_target_range(tgt, weight.size(0));
  const int64_t N = hidden.size(0);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N, "linear_logprobs_bwd: lse must be [N] = [", N,
              "], got ", lse.sizes());
  const bool with_entropy = grad_entropy.has_value() && grad_entropy->defined();
  if (with_entropy) {
    TORCH_CHECK(entropy.has_value() && entropy->dim() == 1 && entropy->size(0) == N,
                "linear_logprobs_bwd: grad_entropy needs the forward's entropy [N] = [", N, "]");
    TORCH_CHECK(grad_entropy->dim() == 1 && grad_entropy->size(0) == N,
                "linear_logprobs_bwd: grad_entropy must be [N] = [", N, "], got ",
                grad_entropy->sizes());
  }
  if (grad_logp.has_value() && grad_logp->defined()) {
    TORCH_CHECK(grad_logp->dim() == 1 && grad_logp->size(0) == N,
                "linear_logprobs_bwd: grad_logp must be [N] = [", N, "], got ",
                grad_logp->sizes());
  }
  at::Tensor H = hidden.detach().contiguous(), W = weight.detach().contiguous();
  const auto acc = H.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dH = need_hidden ? at::empty_like(H) : at::Tensor();
  at::Tensor dW = need_weight ? empty_large(W.numel(), W.options()).view(W.sizes()) : at::Tensor();
  at::Tensor db = need_bias ? at::zeros({W.size(0)}, H.options().dtype(acc)) : at::Tensor();
  if (N == 0 || !(need_hidden || need_weight || need_bias)) {
    if (dH.defined()) dH.zero_();
    if (dW.defined()) dW.zero_();
    return {opt(dH), opt(dW), opt(db)};
  }
  at::Tensor b = as_acc(bias, acc), gl = as_acc(grad_logp, acc), ge = as_acc(grad_entropy, acc);
  at::Tensor ls = lse.detach().to(acc).contiguous();
  at::Tensor en = with_entropy ? as_acc(entropy, acc) : at::Tensor();
  at::Tensor kept;  // the forward's kept logits (an empty one means: recompute)
  if (logits.has_value() && logits->defined() && logits->numel() > 0) kept = logits->detach();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, H.scalar_type(), "linear_logprobs_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (kept.defined()) {
      const int64_t want = KeptLogits::bytes<scalar_t>(N, W.size(0)) /
                           static_cast<int64_t>(sizeof(scalar_t));
      TORCH_CHECK(kept.dim() == 1 && kept.numel() == want && kept.scalar_type() == H.scalar_type()
                      && kept.is_contiguous() && kept.device().is_cpu(),
                  "linear_logprobs_bwd: logits must be the forward's kept buffer for these shapes "
                  "(contiguous ", H.scalar_type(), " [", want, "]), got ", kept.scalar_type(), " ",
                  kept.sizes());
    }
    backward_impl<scalar_t, acc_t>(H, W, tgt, b, make_map<acc_t>(temperature, softcap), gl, ge,
                                   ls, en, kept, dH, dW, db);
  });
  return {opt(dH), opt(dW), opt(db)};
}

}  // namespace
}  // namespace fastpref

TORCH_LIBRARY_FRAGMENT(fastpref_C, m) {
  m.def(
      "linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
      "float temperature, float softcap, bool with_entropy, bool check_targets=True, "
      "int logits_budget=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_logprobs_bwd(Tensor? grad_logp, Tensor? grad_entropy, Tensor hidden, "
      "Tensor weight, Tensor targets, Tensor? bias, Tensor lse, Tensor? entropy, "
      "float temperature, float softcap, bool need_hidden, bool need_weight, bool need_bias, "
      "bool check_targets=True, Tensor? logits=None) -> (Tensor?, Tensor?, Tensor?)");
  m.def("cpu_mm(Tensor a, Tensor b, Tensor(a!) out) -> ()");
  // frees the pooled large buffers of the kernels (empty_large), returns the bytes given back
  m.def("release_large_buffers() -> int", &fastpref::release_large_buffers);
}

TORCH_LIBRARY_IMPL(fastpref_C, CPU, m) {
  m.impl("linear_logprobs_fwd", &fastpref::linear_logprobs_fwd);
  m.impl("linear_logprobs_bwd", &fastpref::linear_logprobs_bwd);
  m.impl("cpu_mm", &fastpref::cpu_mm);
}
