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

// Pairwise kinds on one list, each unordered pair evaluated once. The real items are first
// compacted so the O(n^2) loop touches no padding.
template <typename T>
T pairwise_list(int K, const T* s, const T* r, const bool* m, int kind, int weighting, T sigma,
                T* cs, T* cr, int* idx, ItemPrep<T>* prep, T* cg, T* grad) {
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
  T idcg = T(0);
  for (int i = 0; i < n; ++i) {
    prep[i] = prep_item<T>(i, n, cs, cr, nullptr, kind, weighting);
    idcg += prep[i].ideal_term;
    cg[i] = T(0);
  }
  const T inv_idcg = inv_ideal_dcg(idcg);
  T loss = T(0);
  for (int i = 0; i < n; ++i) {
    for (int j = i + 1; j < n; ++j) {
      if (cr[i] == cr[j]) continue;  // ties form no pair
      const int hi = cr[i] > cr[j] ? i : j;
      const int lo = hi == i ? j : i;
      const T w = pair_weight(kind, weighting, prep[hi], prep[lo], inv_idcg);
      T sp, sg;
      logistic_pair(sigma * (cs[hi] - cs[lo]), &sp, &sg);
      loss += w * sp;
      const T d = sigma * w * sg;
      cg[hi] -= d;
      cg[lo] += d;
    }
  }
  for (int i = 0; i < n; ++i) grad[idx[i]] = cg[i];
  return loss;
}

// Thread-local O(K) scratch, allocated once per parallel_for chunk.
template <typename T>
struct Scratch {
  std::vector<T> cs, cr, cg, cum;
  std::vector<int> idx, perm;
  std::vector<ItemPrep<T>> prep;
  explicit Scratch(int K) : cs(K), cr(K), cg(K), cum(K), idx(K), perm(K), prep(K) {}
};

template <typename T>
T one_list(int K, const T* s, const T* r, const bool* m, int kind, int weighting, T sigma,
           bool itemwise, Scratch<T>& w, T* grad) {
  if (count_real<T>(K, m) < 2) {
    for (int j = 0; j < K; ++j) grad[j] = T(0);
    return T(0);
  }
  if (kind == LISTNET) return listnet_list(K, s, r, m, sigma, grad);
  if (kind == LISTMLE) return listmle_list(K, s, r, m, sigma, w.perm.data(), w.cum.data(), grad);
  if (!itemwise) {
    return pairwise_list(K, s, r, m, kind, weighting, sigma, w.cs.data(), w.cr.data(),
                         w.idx.data(), w.prep.data(), w.cg.data(), grad);
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
    // Enough lists per task that a task does ~16k pair evaluations.
    const int64_t grain = std::max<int64_t>(1, 16384 / (static_cast<int64_t>(K) * K));
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
