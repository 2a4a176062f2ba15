// listwise.cpp: the fused listwise ranking losses of fastpref.listwise_loss on the CPU.
//
// Fused: for each list, the loss AND d loss / d scores in one pass over its pairs (or items);
// the B x K x K pair tensor the plain PyTorch version builds is never materialised. Lists are
// independent, so at::parallel_for splits them over threads; each thread owns O(K) scratch
// (the list's real items compacted, their per-item weights, ListMLE's order and running
// log-sum-exps), so extra memory is O(threads * K) plus the [B, K] gradient that is returned.
// Numerics: all arithmetic is in listwise_math.h (shared with the CUDA kernels), in float for
// float32 inputs and double for float64: softplus/sigmoid from one exp(-|x|), max-subtracted
// softmaxes, reverse running log-add-exp for ListMLE. See that header for the formulas.
//
// Raw ops (the differentiable op is fastpref.ops.listwise_loss, in Python):
//   fastpref_C::listwise_fwd(scores, relevance, mask?, kind, weighting, sigma) -> (loss[B], grad[B,K])
//   fastpref_C::listwise_fwd_itemwise(...)  same result, computed the way the CUDA kernels do
//     (one "thread" per item for the pairwise kinds), so the tests check the device code path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fastpref/listwise_math.h"

namespace {

using namespace fastpref::listwise;

// The O(n^2) pair loop of one list over its compacted real items, each unordered pair once.
// Branch-free in j (d = +1 / -1 / 0 when i is more / less / equally relevant; a tie adds 0),
// with the kind and weighting fixed at compile time, so `omp simd` vectorises it.
template <typename T, int KIND, int WEIGHTING>
T pair_loop(int n, const T* cs, const T* cr, const T* gain, const T* disc, const T* gold,
            T inv_idcg, T sigma, T* cg) {
  T loss = T(0);
  for (int i = 0; i < n; ++i) {
    const T si = cs[i], ri = cr[i], gain_i = gain[i], disc_i = disc[i], gold_i = gold[i];
    T li = T(0), gi = T(0);
#pragma omp simd reduction(+ : li, gi)
    for (int j = i + 1; j < n; ++j) {
      const T d = T(ri > cr[j]) - T(ri < cr[j]);
      const T w = pair_weight_raw<T>(KIND, WEIGHTING, gain_i, gain[j], disc_i, disc[j], gold_i,
                                     gold[j], inv_idcg);
      T sp, sg;
      logistic_pair(sigma * d * (si - cs[j]), &sp, &sg);  // the winner's margin
      li += d * d * w * sp;
      const T c = d * sigma * w * sg;
      gi -= c;
      cg[j] += c;
    }
    cg[i] += gi;
    loss += li;
  }
  return loss;
}

template <typename T, int KIND>
T pair_loop_w(int weighting, int n, const T* cs, const T* cr, const T* gain, const T* disc,
              const T* gold, T inv_idcg, T sigma, T* cg) {
  return weighting == WEIGHT_FIRST
             ? pair_loop<T, KIND, WEIGHT_FIRST>(n, cs, cr, gain, disc, gold, inv_idcg, sigma, cg)
             : pair_loop<T, KIND, WEIGHT_NONE>(n, cs, cr, gain, disc, gold, inv_idcg, sigma, cg);
}

// order[0..n) = indices sorted by v descending, index order among equal values.
template <typename T>
void sort_desc(int n, const T* v, int* order) {
  for (int i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order, order + n, [v](int a, int b) {
    return v[a] > v[b] || (v[a] == v[a] && v[b] != v[b]);  // NaN last, a strict weak order
  });
}

// Pairwise kinds on one list: compact the real items, prepare per-item weights, pair loop.
template <typename T>
T pairwise_list(int K, const T* s, const T* r, const bool* m, int kind, int weighting, T sigma,
                T* cs, T* cr, int* idx, int* order, T* gain, T* disc, T* gold, T* cg,
                T* grad) {
  int n = 0;
  for (int j = 0; j < K; ++j) {
    grad[j] = T(0);
    if (!real_item(m, j)) continue;
    cs[n] = s[j];
    cr[n] = r[j];
    idx[n] = j;
    ++n;
  }
  if (n < 2) return T(0);
  // Per-item weights. The ranks come from sorting (O(n log n)) instead of listwise_math.h's
  // O(n) counting per item; a stable sort gives the same integers (index order among equals).
  T idcg = T(0);
  for (int i = 0; i < n; ++i) {
    gain[i] = T(0);
    disc[i] = T(0);
    gold[i] = T(1);
    cg[i] = T(0);
  }
  if (kind == LAMBDA || kind == LIPO) {
    sort_desc(n, cs, order);
    for (int k = 0; k < n; ++k) disc[order[k]] = inv_discount<T>(k + 1);
    for (int i = 0; i < n; ++i) gain[i] = fastpref::listwise::gain(cr[i]);
  }
  if (kind == LAMBDA || weighting == WEIGHT_FIRST) {
    sort_desc(n, cr, order);
    for (int k = 0; k < n; ++k) {
      const int i = order[k];
      if (kind == LAMBDA) idcg += gain[i] * inv_discount<T>(k + 1);
      // competition rank: tied items share the rank of the first of their group
      gold[i] = (k > 0 && cr[i] == cr[order[k - 1]]) ? gold[order[k - 1]] : T(k + 1);
    }
  }
  const T inv_idcg = inv_ideal_dcg(idcg);
  T loss;
  if (kind == LAMBDA) {
    loss = pair_loop_w<T, LAMBDA>(weighting, n, cs, cr, gain, disc, gold, inv_idcg, sigma, cg);
  } else if (kind == LIPO) {
    loss = pair_loop_w<T, LIPO>(weighting, n, cs, cr, gain, disc, gold, inv_idcg, sigma, cg);
  } else {
    loss = pair_loop_w<T, RANKNET>(weighting, n, cs, cr, gain, disc, gold, inv_idcg, sigma, cg);
  }
  for (int i = 0; i < n; ++i) grad[idx[i]] = cg[i];
  return loss;
}

// Thread-local O(K) scratch, allocated once per parallel_for chunk.
template <typename T>
struct Scratch {
  std::vector<T> cs, cr, cg, cum, gain, disc, gold;
  std::vector<int> idx, perm;
  std::vector<ItemPrep<T>> prep;
  explicit Scratch(int K)
      : cs(K), cr(K), cg(K), cum(K), gain(K), disc(K), gold(K), idx(K), perm(K), prep(K) {}
};

template <typename T>
T one_list(int K, const T* s, const T* r, const bool* m, int kind, int weighting, T sigma,
           bool itemwise, Scratch<T>& w, T* grad) {
  for (int j = 0; j < K; ++j) {
    // NaN or inf relevance would poison the gains and orders: an error, checked here so the
    // op needs no extra pass over the inputs
    const bool finite = r[j] == r[j] && fp_abs(r[j]) != static_cast<T>(INFINITY);
    TORCH_CHECK_VALUE(!real_item(m, j) || finite,
                      "listwise_loss: relevance has NaN or inf entries at real (unmasked) items");
  }
  if (count_real<T>(K, m) < 2) {
    for (int j = 0; j < K; ++j) grad[j] = T(0);
    return T(0);
  }
  if (kind == LISTNET) return listnet_list(K, s, r, m, sigma, grad);
  if (kind == LISTMLE && itemwise) {
    return listmle_list(K, s, r, m, sigma, w.perm.data(), w.cum.data(), grad);
  }
  if (kind == LISTMLE) {  // the order by a stable sort instead of the header's O(K^2) counting
    int n = 0;
    for (int j = 0; j < K; ++j) {
      grad[j] = T(0);
      if (!real_item(m, j)) continue;
      w.cr[n] = r[j];
      w.idx[n++] = j;
    }
    sort_desc(n, w.cr.data(), w.perm.data());
    for (int k = 0; k < n; ++k) w.perm[k] = w.idx[w.perm[k]];
    return listmle_scan(n, s, w.perm.data(), sigma, w.cum.data(), grad);
  }
  if (!itemwise) {
    return pairwise_list(K, s, r, m, kind, weighting, sigma, w.cs.data(), w.cr.data(),
                         w.idx.data(), w.perm.data(), w.gain.data(), w.disc.data(), w.gold.data(),
                         w.cg.data(), grad);
  }
  // The CUDA kernel's schedule: prep per item, a reduction for the IDCG, then each item alone.
  T idcg = T(0);
  for (int i = 0; i < K; ++i) {
    w.prep[i] = prep_item<T>(i, K, s, r, m, kind, weighting);
    if (real_item(m, i)) idcg += w.prep[i].ideal_term;
  }
  const T inv_idcg = inv_ideal_dcg(idcg);
  T loss = T(0);
  for (int i = 0; i < K; ++i) {
    T li;
    pairwise_item(i, K, s, r, m, w.prep.data(), kind, weighting, sigma, inv_idcg, &li, &grad[i]);
    loss += li;
  }
  return loss;
}

void check_inputs(const at::Tensor& scores, const at::Tensor& relevance,
                  const std::optional<at::Tensor>& mask, int64_t kind, int64_t weighting,
                  double sigma) {
  TORCH_CHECK(scores.dim() == 2, "listwise_loss: scores must be [B, K], got ", scores.sizes());
  TORCH_CHECK(relevance.sizes() == scores.sizes(), "listwise_loss: relevance must be [B, K] = ",
              scores.sizes(), " like scores, got ", relevance.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "listwise_loss: the raw kernel takes float32/float64 scores, got ",
              scores.scalar_type());
  TORCH_CHECK(relevance.scalar_type() == scores.scalar_type(),
              "listwise_loss: relevance must have the dtype of scores (", scores.scalar_type(),
              "), got ", relevance.scalar_type());
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == scores.sizes(), "listwise_loss: mask must be [B, K] = ",
                scores.sizes(), ", got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool, "listwise_loss: mask must be bool, got ",
                mask->scalar_type());
  }
  TORCH_CHECK(kind >= RANKNET && kind <= LIPO, "listwise_loss: unknown kind code ", kind);
  TORCH_CHECK(weighting == WEIGHT_NONE || weighting == WEIGHT_FIRST,
              "listwise_loss: unknown weighting code ", weighting);
  TORCH_CHECK(weighting == WEIGHT_NONE || is_pairwise(static_cast<int>(kind)),
              "listwise_loss: weighting applies to the pairwise kinds only");
  TORCH_CHECK(sigma > 0, "listwise_loss: sigma must be positive, got ", sigma);
}

std::tuple<at::Tensor, at::Tensor> listwise_cpu(const at::Tensor& scores_in,
                                                const at::Tensor& relevance_in,
                                                const std::optional<at::Tensor>& mask_in,
                                                int64_t kind, int64_t weighting, double sigma,
                                                bool itemwise) {
  check_inputs(scores_in, relevance_in, mask_in, kind, weighting, sigma);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor relevance = relevance_in.contiguous();
  at::Tensor mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  const int64_t B = scores.size(0);
  const int K = static_cast<int>(scores.size(1));
  at::Tensor loss = at::empty({B}, scores.options());
  at::Tensor grad = at::empty({B, K}, scores.options());
  if (B == 0 || K == 0) {
    loss.zero_();
    return {loss, grad};
  }
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "listwise_cpu", [&] {
    using T = scalar_t;
    const T* s = scores.const_data_ptr<T>();
    const T* r = relevance.const_data_ptr<T>();
    const bool* m = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
    T* out = loss.mutable_data_ptr<T>();
    T* g = grad.mutable_data_ptr<T>();
    const T sig = static_cast<T>(sigma);
    // ~64k pair evaluations (tens of microseconds) per task: smaller batches run inline, as
    // waking the thread pool costs more than it saves.
    const int64_t grain = std::max<int64_t>(1, 65536 / (static_cast<int64_t>(K) * K));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      Scratch<T> w(K);
      for (int64_t b = begin; b < end; ++b) {
        const bool* mb = m == nullptr ? nullptr : m + b * K;
        out[b] = one_list<T>(K, s + b * K, r + b * K, mb, static_cast<int>(kind),
                             static_cast<int>(weighting), sig, itemwise, w, g + b * K);
      }
    });
  });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> listwise_fwd(const at::Tensor& scores,
                                                const at::Tensor& relevance,
                                                const std::optional<at::Tensor>& mask,
                                                int64_t kind, int64_t weighting, double sigma) {
  return listwise_cpu(scores, relevance, mask, kind, weighting, sigma, /*itemwise=*/false);
}

std::tuple<at::Tensor, at::Tensor> listwise_fwd_itemwise(const at::Tensor& scores,
                                                         const at::Tensor& relevance,
                                                         const std::optional<at::Tensor>& mask,
                                                         int64_t kind, int64_t weighting,
                                                         double sigma) {
  return listwise_cpu(scores, relevance, mask, kind, weighting, sigma, /*itemwise=*/true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpref_C, m) {
  m.def(
      "listwise_fwd(Tensor scores, Tensor relevance, Tensor? mask, int kind, int weighting, "
      "float sigma) -> (Tensor, Tensor)");
  m.def(
      "listwise_fwd_itemwise(Tensor scores, Tensor relevance, Tensor? mask, int kind, "
      "int weighting, float sigma) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastpref_C, CPU, m) {
  m.impl("listwise_fwd", &listwise_fwd);
  m.impl("listwise_fwd_itemwise", &listwise_fwd_itemwise);
}
