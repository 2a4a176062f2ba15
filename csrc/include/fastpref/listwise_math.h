// listwise_math.h: the arithmetic of fastpref.listwise_loss, shared by the C++ CPU kernels
// (csrc/cpu/listwise.cpp) and the CUDA kernels (csrc/cuda/listwise.cu).
//
// Every function is `__host__ __device__` under nvcc and plain `inline` under g++, so the CPU
// build runs exactly the arithmetic the GPU runs and the CPU tests cover the device math.
// No ATen, no STL containers, no allocation: callers pass the O(K) scratch they own.
//
// One list = K items with scores s, relevance r and an optional mask m (nullptr = all real).
// Let x = sigma * (s_i - s_j). The pairwise kinds sum, over ordered pairs of real items with
// r_i > r_j (ties form no pair), w_ij * softplus(-x), whose derivative in s_i is
// -sigma * w_ij * sigmoid(-x) (and the opposite in s_j). Both come from one exp(-|x|), so
// neither overflows for |x| up to the float range:
//   softplus(-x) = max(-x, 0) + log1p(exp(-|x|)),  sigmoid(-x) = (x < 0 ? 1 : e) / (1 + e).
// In float, that exp and log1p are branch-free polynomials (exp_nonpos, log1p_unit; < 2 ulp) so
// the CPU pair loop vectorises; the device runs the very same operations.
// Pair weights w_ij (detached, never differentiated):
//   ranknet  1
//   lambda   |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)| / IDCG      (|delta NDCG| of swapping i, j)
//   lipo     |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|             (LiPO-lambda, no normalisation)
// with G = 2^r - 1, D(t) = log2(1 + t), tau = 1-based rank by current score (descending,
// index order among equal scores), IDCG = sum_i G_i / D(pi_i), pi = 1-based rank by relevance
// (descending, index order among ties). A list with IDCG <= 0 has lambda weights 0.
// weighting FIRST multiplies w_ij by 1 / (rho_i + rho_j), rho = 1-based gold rank
// 1 + #{real j : r_j > r_i} (tied items share a rank).
// listnet = -sum_i softmax(r)_i * log_softmax(sigma*s)_i, both with the max subtracted.
// listmle = sum_k [logsumexp_{l >= k} sigma*s_{pi_l} - sigma*s_{pi_k}] over the order pi by
// relevance, a reverse running log-add-exp (never log of a sum that can underflow to 0).
#pragma once

#include <math.h>
#include <string.h>

#if defined(__CUDACC__)
#define FP_HD __host__ __device__ __forceinline__
#else
#define FP_HD inline
#endif

namespace fastpref {
namespace listwise {

// The integer codes the Python layer passes (fastpref/ops/listwise.py keeps the same table).
enum Kind : int { RANKNET = 0, LAMBDA = 1, LISTNET = 2, LISTMLE = 3, LIPO = 4 };
enum Weighting : int { WEIGHT_NONE = 0, WEIGHT_FIRST = 1 };

FP_HD bool is_pairwise(int kind) { return kind == RANKNET || kind == LAMBDA || kind == LIPO; }

// Overloads so one template serves float (fp32/bf16/fp16 inputs) and double (gradcheck).
FP_HD float fp_exp(float x) { return expf(x); }
FP_HD double fp_exp(double x) { return exp(x); }
FP_HD float fp_log(float x) { return logf(x); }
FP_HD double fp_log(double x) { return log(x); }
FP_HD float fp_log1p(float x) { return log1pf(x); }
FP_HD double fp_log1p(double x) { return log1p(x); }
FP_HD float fp_log2(float x) { return log2f(x); }
FP_HD double fp_log2(double x) { return log2(x); }
FP_HD float fp_exp2(float x) { return exp2f(x); }
FP_HD double fp_exp2(double x) { return exp2(x); }
FP_HD float fp_abs(float x) { return fabsf(x); }
FP_HD double fp_abs(double x) { return fabs(x); }

FP_HD bool real_item(const bool* m, int j) { return m == nullptr || m[j]; }

template <typename T>
FP_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// log(exp(a) + exp(b)) without overflow; -inf is the identity.
template <typename T>
FP_HD T log_add_exp(T a, T b) {
  T hi = a > b ? a : b;
  T lo = a > b ? b : a;
  if (hi == neg_inf<T>()) return hi;
  return hi + fp_log1p(fp_exp(lo - hi));
}

// exp(x) for x <= 0 in float, branch-free so the CPU loops vectorise (no libm call) and the
// device runs the same operations: Cephes expf (range reduction by ln 2 in two parts, degree-6
// polynomial, |relative error| < 2 ulp), 2^n applied through the exponent bits. Below -87 the
// result is under FLT_MIN and is flushed to 0.
FP_HD float bits_to_float(int i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  memcpy(&f, &i, sizeof(f));
  return f;
#endif
}

FP_HD float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  // round(x / ln 2) by the 1.5 * 2^23 trick: exact for |x| < 2^22, no rint call
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * (r * r) + r) + 1.0f;
  const float scaled = y * bits_to_float((static_cast<int>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : scaled;
}

// log1p(e) for e in [0, 1] in float: 2 atanh(t), t = e / (2 + e) in [0, 1/3], as the odd series
// to t^15 (truncation < 1e-8 relative, below float rounding). No cancellation for tiny e (the
// result is 2t(1 + ...) ~ e), no libm call.
FP_HD float log1p_unit(float e) {
  const float t = e / (2.0f + e);
  const float t2 = t * t;
  float p = 1.0f / 15.0f;
  p = p * t2 + 1.0f / 13.0f;
  p = p * t2 + 1.0f / 11.0f;
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  return 2.0f * t * p;
}

// softplus(-x) and sigmoid(-x) from one exp(-|x|) = e in (0, 1]:
//   softplus(-x) = max(-x, 0) + log1p(e),  sigmoid(-x) = (x < 0 ? 1 : e) / (1 + e).
// float: the branch-free exp/log1p above (the CPU pair loop is vectorised over j); double
// (the gradcheck path): libm.
FP_HD void logistic_pair(float x, float* softplus_neg_x, float* sigmoid_neg_x) {
  const float e = exp_nonpos(-fabsf(x));
  *softplus_neg_x = (x < 0.0f ? -x : 0.0f) + log1p_unit(e);
  *sigmoid_neg_x = (x < 0.0f ? 1.0f : e) / (1.0f + e);
}

FP_HD void logistic_pair(double x, double* softplus_neg_x, double* sigmoid_neg_x) {
  const double e = exp(-fabs(x));
  *softplus_neg_x = (x < 0.0 ? -x : 0.0) + log1p(e);
  *sigmoid_neg_x = (x < 0.0 ? 1.0 : e) / (1.0 + e);
}

template <typename T>
FP_HD T gain(T r) {
  return fp_exp2(r) - T(1);
}

// 1 / D(rank) = 1 / log2(1 + rank), rank 1-based.
template <typename T>
FP_HD T inv_discount(int rank) {
  return T(1) / fp_log2(T(1) + T(rank));
}

template <typename T>
FP_HD int count_real(int K, const bool* m) {
  int n = 0;
  for (int j = 0; j < K; ++j) n += real_item(m, j) ? 1 : 0;
  return n;
}

// 1-based position of item i when the real items are sorted by v descending, index order
// among equal values (what a stable descending sort gives).
template <typename T>
FP_HD int stable_rank_desc(int i, int K, const T* v, const bool* m) {
  int rank = 1;
  for (int j = 0; j < K; ++j) {
    if (j == i || !real_item(m, j)) continue;
    rank += (v[j] > v[i] || (v[j] == v[i] && j < i)) ? 1 : 0;
  }
  return rank;
}

// 1-based competition rank by v descending: tied items share the best rank (FIRST's rho).
template <typename T>
FP_HD int gold_rank(int i, int K, const T* v, const bool* m) {
  int rank = 1;
  for (int j = 0; j < K; ++j) rank += (real_item(m, j) && v[j] > v[i]) ? 1 : 0;
  return rank;
}

// Per-item quantities the pair weights need, computed once per item in O(K).
template <typename T>
struct ItemPrep {
  T gain;          // G_i = 2^r_i - 1
  T inv_disc;      // 1 / log2(1 + tau_i), tau_i = rank by current score
  T gold;          // rho_i, FIRST's 1-based gold rank
  T ideal_term;    // G_i / log2(1 + pi_i); summed over items it is the IDCG
};

template <typename T>
FP_HD ItemPrep<T> prep_item(int i, int K, const T* s, const T* r, const bool* m, int kind,
                            int weighting) {
  ItemPrep<T> p;
  p.gain = T(0);
  p.inv_disc = T(0);
  p.gold = T(1);
  p.ideal_term = T(0);
  if (kind == LAMBDA || kind == LIPO) {
    p.gain = gain(r[i]);
    p.inv_disc = inv_discount<T>(stable_rank_desc(i, K, s, m));
    if (kind == LAMBDA) p.ideal_term = p.gain * inv_discount<T>(stable_rank_desc(i, K, r, m));
  }
  if (weighting == WEIGHT_FIRST) p.gold = T(gold_rank(i, K, r, m));
  return p;
}

// 1 / IDCG for lambda; 0 when the ideal DCG is not positive (nothing to gain by sorting).
template <typename T>
FP_HD T inv_ideal_dcg(T idcg) {
  return idcg > T(0) ? T(1) / idcg : T(0);
}

// w_ij of the more relevant item i over j (symmetric in i, j), from the items' prepared values.
template <typename T>
FP_HD T pair_weight_raw(int kind, int weighting, T gain_i, T gain_j, T disc_i, T disc_j,
                        T gold_i, T gold_j, T inv_idcg) {
  T w = T(1);
  if (kind == LAMBDA || kind == LIPO) {
    w = fp_abs(gain_i - gain_j) * fp_abs(disc_i - disc_j);
    if (kind == LAMBDA) w *= inv_idcg;
  }
  if (weighting == WEIGHT_FIRST) w /= (gold_i + gold_j);
  return w;
}

template <typename T>
FP_HD T pair_weight(int kind, int weighting, const ItemPrep<T>& a, const ItemPrep<T>& b,
                    T inv_idcg) {
  return pair_weight_raw(kind, weighting, a.gain, b.gain, a.inv_disc, b.inv_disc, a.gold, b.gold,
                         inv_idcg);
}

// What one item contributes when each item is its own thread (the CUDA pairwise kernel):
// *loss gets the pairs it wins (r_i > r_j), *grad its full d loss / d s_i.
// Every pair is evaluated twice (once by each item) so no thread writes another's gradient.
template <typename T>
FP_HD void pairwise_item(int i, int K, const T* s, const T* r, const bool* m,
                         const ItemPrep<T>* prep, int kind, int weighting, T sigma, T inv_idcg,
                         T* loss, T* grad) {
  T l = T(0), g = T(0);
  if (real_item(m, i)) {
    for (int j = 0; j < K; ++j) {
      if (j == i || !real_item(m, j) || r[i] == r[j]) continue;
      T w = pair_weight(kind, weighting, prep[i], prep[j], inv_idcg);
      T sp, sg;
      if (r[i] > r[j]) {
        logistic_pair(sigma * (s[i] - s[j]), &sp, &sg);
        l += w * sp;
        g -= sigma * w * sg;
      } else {
        logistic_pair(sigma * (s[j] - s[i]), &sp, &sg);
        g += sigma * w * sg;
      }
    }
  }
  *loss = l;
  *grad = g;
}

// ListNet for one list: returns the loss and writes d loss / d s into grad[0..K).
template <typename T>
FP_HD T listnet_list(int K, const T* s, const T* r, const bool* m, T sigma, T* grad) {
  T smax = neg_inf<T>(), rmax = neg_inf<T>();
  for (int j = 0; j < K; ++j) {
    if (!real_item(m, j)) continue;
    smax = sigma * s[j] > smax ? sigma * s[j] : smax;
    rmax = r[j] > rmax ? r[j] : rmax;
  }
  T zs = T(0), zr = T(0);
  for (int j = 0; j < K; ++j) {
    if (!real_item(m, j)) continue;
    zs += fp_exp(sigma * s[j] - smax);
    zr += fp_exp(r[j] - rmax);
  }
  T lse = smax + fp_log(zs);
  T loss = T(0);
  for (int j = 0; j < K; ++j) {
    if (!real_item(m, j)) {
      grad[j] = T(0);
      continue;
    }
    T p = fp_exp(r[j] - rmax) / zr;    // target softmax(r)
    T logq = sigma * s[j] - lse;       // log softmax(sigma * s)
    loss -= p * logq;
    grad[j] = sigma * (fp_exp(logq) - p);  // sum_j p_j = 1
  }
  return loss;
}

// ListMLE's two scans over the real items in relevance order perm[0..n) (grad pre-zeroed).
// cum[k] = logsumexp of sigma*s over positions k..n-1 (reverse logcumsumexp).
// d loss / d s at position k = sigma * (sum_{k' <= k} exp(sigma*s - cum[k']) - 1), accumulated
// as a forward running log-add-exp of -cum so the sum stays in range.
template <typename T>
FP_HD T listmle_scan(int n, const T* s, const int* perm, T sigma, T* cum, T* grad) {
  T run = neg_inf<T>(), loss = T(0);
  for (int k = n - 1; k >= 0; --k) {
    T z = sigma * s[perm[k]];
    run = log_add_exp(run, z);
    cum[k] = run;
    loss += run - z;
  }
  T acc = neg_inf<T>();  // log sum_{k' <= k} exp(-cum[k'])
  for (int k = 0; k < n; ++k) {
    acc = log_add_exp(acc, -cum[k]);
    grad[perm[k]] = sigma * (fp_exp(sigma * s[perm[k]] + acc) - T(1));
  }
  return loss;
}

// ListMLE for one list. perm[K] and cum[K] are caller-owned scratch (O(K) per list); the order
// by relevance (ties in index order) comes from counting, O(K^2), no sort needed on the device.
template <typename T>
FP_HD T listmle_list(int K, const T* s, const T* r, const bool* m, T sigma, int* perm, T* cum,
                     T* grad) {
  int n = 0;
  for (int j = 0; j < K; ++j) {
    grad[j] = T(0);
    if (!real_item(m, j)) continue;
    perm[stable_rank_desc(j, K, r, m) - 1] = j;
    ++n;
  }
  return listmle_scan(n, s, perm, sigma, cum, grad);
}

}  // namespace listwise
}  // namespace fastpref
