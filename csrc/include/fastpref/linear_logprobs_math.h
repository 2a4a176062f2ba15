// linear_logprobs_math.h: the arithmetic of fastpref.linear_logprobs on the CPU, used by the
// tiled launchers in csrc/cpu/linear_logprobs.cpp (which own tiling, GEMMs, threads, memory).
//
// What is computed, per row of a logits tile (z = h . w_v, before the bias):
//   f = softcap * tanh((z + b) / softcap) / temperature      (softcap optional: (z + b) / temp)
//   online log-sum-exp: a running max m, s = sum exp(f - m) and, for the entropy,
//     a = sum exp(f - m) (f - m); lse = m + log s, entropy = log s - a / s
//   logit gradient: gz = (g (onehot - p) - ge p (f - E_p f)) * df/dz, p = exp(f - lse)
// Why the numerics are safe: exp never sees a positive argument; the entropy log(s) - a/s never
// cancels two large numbers; a NaN/inf in a row makes that row's lse NaN and its gradient NaN
// (never garbage); probabilities below exp(kLogProbCutoff) enter the gradient as exact zeros,
// so the tile that feeds the dH/dW GEMMs holds no values whose products could be denormal.
//
// CPU only (at::vec::Vectorized SIMD, no allocation, no ATen tensors): unlike listwise_math.h
// there is no device twin, so no __host__ __device__ macros. Include this header before any
// other ATen header: it selects (cpu_capability.h) the SIMD the Vectorized type is built for.
#pragma once

#include "fastpref/cpu_capability.h"  // first: before any ATen header

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastpref {
namespace linear_logprobs {

// Probabilities below exp(-46) ~ 1e-20 enter the logit gradient as exact zeros: their share of
// a row's gradient is < V * 1e-20, far below fp32 resolution, and it keeps the G tile free of
// the tiny values whose products with W would be denormal inside the dH/dW GEMMs (which may
// run on threads without FTZ).
constexpr float kLogProbCutoff = -46.0f;

template <typename acc_t>
struct LogitMap {
  acc_t inv_temp;   // 1 / temperature
  acc_t inv_cap;    // 1 / softcap
  acc_t cap_scale;  // softcap / temperature
  bool has_cap;
};

template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return (std::isnan(a) || a >= b) ? a : b;
}

template <typename acc_t>
inline at::vec::Vectorized<acc_t> fast_exp(const at::vec::Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();  // ~1e-6 relative, 2-3x cheaper than Sleef's u10; args here are <= 0
  } else {
    return x.exp();
  }
}

// f = map(z + b) over one row of n logits, written to out (which may be z itself: in place);
// returns the NaN-propagating max.
template <typename acc_t>
inline acc_t map_row_max(const acc_t* z, acc_t* out, const acc_t* b, int64_t n,
                         const LogitMap<acc_t>& o) {
  using V = at::vec::Vectorized<acc_t>;
  const V vit(o.inv_temp), vic(o.inv_cap), vcs(o.cap_scale);
  V vmax(-std::numeric_limits<acc_t>::infinity());
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    V v = V::loadu(z + j);
    if (b) v = v + V::loadu(b + j);
    v = o.has_cap ? (v * vic).tanh() * vcs : v * vit;
    v.store(out + j);
    vmax = at::vec::maximum(vmax, v);
  }
  acc_t m = at::vec::vec_reduce_all<acc_t>(
      [](V& x, V& y) { return at::vec::maximum(x, y); }, vmax);
  for (; j < n; ++j) {
    acc_t v = z[j] + (b ? b[j] : acc_t(0));
    v = o.has_cap ? std::tanh(v * o.inv_cap) * o.cap_scale : v * o.inv_temp;
    out[j] = v;
    m = nan_max(m, v);
  }
  return m;
}

// Online update of one row's (m, s, a) with n mapped logits f.
template <typename acc_t>
inline void lse_update(const acc_t* f, int64_t n, acc_t tile_max, bool entropy, acc_t& m,
                       acc_t& s, acc_t& a) {
  using V = at::vec::Vectorized<acc_t>;
  if (std::isnan(m)) return;
  const acc_t m_new = nan_max(m, tile_max);
  if (!std::isfinite(m_new)) {  // NaN/inf in the row (or an all -inf tile while m = -inf)
    if (std::isnan(m_new) || m_new > 0) m = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  if (m_new > m) {  // rescale the running sums to the new max
    const acc_t scale = std::exp(m - m_new);  // m = -inf gives 0
    if (entropy) a = (s > 0) ? scale * (a + (m - m_new) * s) : acc_t(0);
    s *= scale;
    m = m_new;
  }
  const V vm(m), zero(0);
  V vs(0), va(0);
  int64_t j = 0;
  if (entropy) {
    for (; j + V::size() <= n; j += V::size()) {
      V d = V::loadu(f + j) - vm;
      V e = fast_exp(d);
      vs = vs + e;
      va = va + V::blendv(zero, e * d, e > zero);  // exp(-inf) * -inf would be NaN
    }
  } else {
    for (; j + V::size() <= n; j += V::size()) vs = vs + fast_exp(V::loadu(f + j) - vm);
  }
  acc_t ss = at::vec::vec_reduce_all<acc_t>([](V& x, V& y) { return x + y; }, vs);
  acc_t aa = entropy ? at::vec::vec_reduce_all<acc_t>([](V& x, V& y) { return x + y; }, va) : 0;
  for (; j < n; ++j) {
    acc_t d = f[j] - m;
    acc_t e = std::exp(d);
    ss += e;
    if (entropy && e > 0) aa += e * d;
  }
  s += ss;
  a += aa;
}

// Gradient of the raw logits z of one row, written to out (scalar_t) and added to db (acc_t).
// gz = (g (onehot - p) - ge p (f - ef)) * df/dz with p = exp(f - lse).
template <typename scalar_t, typename acc_t>
inline void grad_row(const acc_t* z, const acc_t* b, int64_t n, const LogitMap<acc_t>& o,
                     int64_t tgt, acc_t g, acc_t ge, acc_t lse, acc_t ef, bool entropy,
                     scalar_t* out, acc_t* db, acc_t* scratch) {
  using V = at::vec::Vectorized<acc_t>;
  if (!std::isfinite(lse)) {  // a NaN/inf row: its gradient is NaN, not garbage
    std::fill(out, out + n, scalar_t(std::numeric_limits<acc_t>::quiet_NaN()));
    return;
  }
  const V vit(o.inv_temp), vic(o.inv_cap), vcs(o.cap_scale), vlse(lse), vg(-g), vge(ge),
      vef(ef), one(1), zero(0), vcut(kLogProbCutoff);
  // The +g onehot term at the target, taken before the loop: out may alias z (fp32 in place).
  acc_t onehot = 0;
  if (tgt >= 0) {
    acc_t dfdz = o.inv_temp;
    if (o.has_cap) {
      const acc_t t = std::tanh((z[tgt] + (b ? b[tgt] : acc_t(0))) * o.inv_cap);
      dfdz = (1 - t * t) * o.inv_temp;
    }
    onehot = g * dfdz;
  }
  // gz is computed in acc_t into `row` (the output itself when scalar_t == acc_t, else a
  // per-thread scratch row) and converted to scalar_t once, vectorised, at the end
  acc_t* row = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out) : scratch;
  int64_t j = 0;
  auto lane = [&](V v) -> V {
    V f, dfdz;
    if (o.has_cap) {
      V t = (v * vic).tanh();
      f = t * vcs;
      dfdz = (one - t * t) * vit;
    } else {
      f = v * vit;
      dfdz = vit;
    }
    V d = f - vlse;
    V p = V::blendv(fast_exp(d), zero, d < vcut);
    V gf = p * vg;
    if (entropy) gf = gf - V::blendv(zero, p * vge * (f - vef), p > zero);
    return gf * dfdz;
  };
  for (; j + V::size() <= n; j += V::size()) {
    V v = V::loadu(z + j);
    if (b) v = v + V::loadu(b + j);
    V gz = lane(v);
    if (db) (V::loadu(db + j) + gz).store(db + j);
    gz.store(row + j);
  }
  for (; j < n; ++j) {
    acc_t v = z[j] + (b ? b[j] : acc_t(0));
    acc_t f, dfdz;
    if (o.has_cap) {
      acc_t t = std::tanh(v * o.inv_cap);
      f = t * o.cap_scale;
      dfdz = (1 - t * t) * o.inv_temp;
    } else {
      f = v * o.inv_temp;
      dfdz = o.inv_temp;
    }
    acc_t p = (f - lse < kLogProbCutoff) ? acc_t(0) : std::exp(f - lse);
    acc_t gf = -g * p;
    if (entropy && p > 0) gf -= ge * p * (f - ef);
    acc_t gz = gf * dfdz;
    if (db) db[j] += gz;
    row[j] = gz;
  }
  if (tgt >= 0) {
    row[tgt] += onehot;
    if (db) db[tgt] += onehot;
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(row, out, n);
}

// The reciprocals of one call's temperature and softcap (softcap <= 0: no softcap). The launcher
// checks the values; this only does the arithmetic.
template <typename acc_t>
inline LogitMap<acc_t> make_logit_map(double temperature, double softcap) {
  LogitMap<acc_t> o;
  o.inv_temp = acc_t(1.0 / temperature);
  o.has_cap = softcap > 0;
  o.inv_cap = o.has_cap ? acc_t(1.0 / softcap) : acc_t(0);
  o.cap_scale = acc_t(softcap / temperature);
  return o;
}

// Merges P partial online states of one row, in order (m at m0[p * task_stride], s and a at
// field_stride and 2 * field_stride past it): returns lse (NaN for a NaN/inf row) and writes the
// entropy log(S) - A / S when ent is not null.
template <typename acc_t>
inline acc_t merge_states(const acc_t* m0, int64_t task_stride, int64_t field_stride, int64_t P,
                          acc_t* ent) {
  acc_t M = -std::numeric_limits<acc_t>::infinity();
  for (int64_t p = 0; p < P; ++p) M = nan_max(M, m0[p * task_stride]);
  acc_t S = 0, A = 0;
  if (std::isfinite(M)) {
    for (int64_t p = 0; p < P; ++p) {
      const acc_t* st = m0 + p * task_stride;
      const acc_t mp = st[0], sp = st[field_stride], ap = st[2 * field_stride];
      if (sp > 0) {
        const acc_t scale = std::exp(mp - M);
        S += sp * scale;
        A += scale * (ap + (mp - M) * sp);
      }
    }
  }
  const acc_t L = std::isfinite(M) ? M + std::log(S) : std::numeric_limits<acc_t>::quiet_NaN();
  if (ent) *ent = std::isfinite(L) ? std::log(S) - A / S : L;
  return L;
}

}  // namespace linear_logprobs
}  // namespace fastpref
