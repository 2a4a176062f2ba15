// decoder_math.h: the per-row arithmetic of fastpref.ops.decoder (RMSNorm, SwiGLU) on the CPU,
// used by csrc/cpu/decoder.cpp (which owns threads, shapes and the dW reduction).
//
// RMSNorm (Zhang & Sennrich 2019, as Llama / Mistral / Qwen2 write it in transformers):
//   r = 1 / sqrt(mean(x^2) + eps),  xhat = x r,  y = w * xhat         (all in fp32)
//   bf16: xhat is rounded to bf16 before the product and y rounded again, as
//   `weight * hidden.to(bfloat16)` does; the gradient passes through the roundings.
//   backward: gx = g w,  c = mean(gx xhat),  dx = r (gx - xhat c),  dw += g xhat  (fp32)
// SwiGLU (Shazeer 2020): h = silu(a) * b, silu(a) = a s, s = 1 / (1 + exp(-a))
//   bf16: silu(a) is rounded to bf16 before the product (`act_fn(gate) * up`), h again.
//   backward: da = g b s (1 + a (1 - s)),  db = g silu(a)
// Accumulation is fp32 for either dtype. CPU only (at::vec::Vectorized): no device twin.
// Include this header before any other ATen header (cpu_capability.h picks the SIMD).
#pragma once

#include "fastpref/cpu_capability.h"  // first: before any ATen header

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fastpref {
namespace decoder {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 256;  // elements widened to fp32 at a time for bf16 rows

template <typename T>
inline float widen(T v) {
  return static_cast<float>(v);
}

// Rounds to T and back (the identity for float): the bf16 rounding the reference applies.
template <typename T>
inline float round_to(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return static_cast<float>(static_cast<T>(v));
  }
}

// fp32 copies of n elements of a row (n <= kChunk), so every dtype runs the same fp32 loops.
template <typename T>
inline const float* as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

inline float sum_of_squares(const float* x, int64_t n) {
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i);
    acc = at::vec::fmadd(v, v, acc);
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// One row of RMSNorm: writes y[0, D) and returns r = 1 / sqrt(mean(x^2) + eps).
template <typename T>
inline float rms_norm_row(const T* x, const T* w, T* y, int64_t D, float eps) {
  float buf[kChunk], wbuf[kChunk];
  float ss = 0.0f;
  for (int64_t j = 0; j < D; j += kChunk) {
    const int64_t n = std::min(kChunk, D - j);
    ss += sum_of_squares(as_float(x + j, n, buf), n);
  }
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t j = 0; j < D; j += kChunk) {
    const int64_t n = std::min(kChunk, D - j);
    const float* xf = as_float(x + j, n, buf);
    const float* wf = as_float(w + j, n, wbuf);
    for (int64_t i = 0; i < n; ++i) {
      y[j + i] = static_cast<T>(wf[i] * round_to<T>(xf[i] * r));
    }
  }
  return r;
}

// One row of RMSNorm's backward: writes dx[0, D) and adds g * xhat into dw_acc[0, D) (fp32).
template <typename T>
inline void rms_norm_row_backward(const T* g, const T* x, const T* w, float r, T* dx,
                                  float* dw_acc, int64_t D) {
  float gbuf[kChunk], xbuf[kChunk], wbuf[kChunk];
  float dot = 0.0f;  // sum over the row of (g w) xhat
  for (int64_t j = 0; j < D; j += kChunk) {
    const int64_t n = std::min(kChunk, D - j);
    const float* gf = as_float(g + j, n, gbuf);
    const float* xf = as_float(x + j, n, xbuf);
    const float* wf = as_float(w + j, n, wbuf);
    for (int64_t i = 0; i < n; ++i) {
      const float xhat = xf[i] * r;
      dot += gf[i] * wf[i] * xhat;
      dw_acc[j + i] += gf[i] * xhat;
    }
  }
  const float c = dot / static_cast<float>(D);
  for (int64_t j = 0; j < D; j += kChunk) {
    const int64_t n = std::min(kChunk, D - j);
    const float* gf = as_float(g + j, n, gbuf);
    const float* xf = as_float(x + j, n, xbuf);
    const float* wf = as_float(w + j, n, wbuf);
    for (int64_t i = 0; i < n; ++i) {
      dx[j + i] = static_cast<T>(r * (gf[i] * wf[i] - xf[i] * r * c));
    }
  }
}

// sigmoid of n fp32 values (n <= kChunk) into s. exp's argument is clamped to [-80, 80]
// (ATen's exp_u20, ~1e-6 relative, is only specified inside the finite range): beyond it
// s is already 1 to fp32 or below 2e-35, where silu(a) = a s rounds to what the full formula
// gives to within 1e-33 absolute.
inline void sigmoid(const float* a, float* s, int64_t n) {
  const Vec one(1.0f), lo(-80.0f), hi(80.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = at::vec::clamp(Vec::loadu(a + i).neg(), lo, hi);
    (one / (one + v.exp_u20())).store(s + i);
  }
  for (; i < n; ++i) s[i] = 1.0f / (1.0f + std::exp(std::clamp(-a[i], -80.0f, 80.0f)));
}

// h[0, n) = silu(a) * b over a contiguous run of n elements.
template <typename T>
inline void swiglu_run(const T* a, const T* b, T* h, int64_t n) {
  float abuf[kChunk], bbuf[kChunk], s[kChunk];
  for (int64_t j = 0; j < n; j += kChunk) {
    const int64_t m = std::min(kChunk, n - j);
    const float* af = as_float(a + j, m, abuf);
    const float* bf = as_float(b + j, m, bbuf);
    sigmoid(af, s, m);
    for (int64_t i = 0; i < m; ++i) h[j + i] = static_cast<T>(round_to<T>(af[i] * s[i]) * bf[i]);
  }
}

// da, db over a contiguous run of n elements (the gradient of h = silu(a) * b).
template <typename T>
inline void swiglu_run_backward(const T* g, const T* a, const T* b, T* da, T* db, int64_t n) {
  float gbuf[kChunk], abuf[kChunk], bbuf[kChunk], s[kChunk];
  for (int64_t j = 0; j < n; j += kChunk) {
    const int64_t m = std::min(kChunk, n - j);
    const float* gf = as_float(g + j, m, gbuf);
    const float* af = as_float(a + j, m, abuf);
    const float* bf = as_float(b + j, m, bbuf);
    sigmoid(af, s, m);
    for (int64_t i = 0; i < m; ++i) {
      const float silu = af[i] * s[i];
      da[j + i] = static_cast<T>(gf[i] * bf[i] * s[i] * (1.0f + af[i] * (1.0f - s[i])));
      db[j + i] = static_cast<T>(gf[i] * round_to<T>(silu));
    }
  }
}

}  // namespace decoder
}  // namespace fastpref
