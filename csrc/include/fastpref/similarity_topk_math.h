// similarity_topk_math.h: the ranking arithmetic of fastpref.similarity_topk on the CPU, used by
// csrc/cpu/similarity_topk.cpp (which owns the tiles, GEMMs, threads and memory).
//
// The order: descending score, equal scores by ascending corpus index, NaN after every number
// (NaNs among themselves by index). It is a total order on (score, index) pairs, encoded as one
// int64 key so that "better" is ">" on integers:
//   key = sortable(score) * 2^32 + (2^32 - 1 - index)
// where sortable() maps a float32 to an int32 in the same order (negative floats get their
// magnitude bits flipped; -0 is first made +0 so that 0 and -0 tie; NaN maps to INT32_MIN, below
// -inf). Distinct (score, index) pairs have distinct keys, so the top k are unique whatever the
// tiling or the thread count: the result is exact and deterministic. Corpus indices must be
// < 2^32 - 1; kNoKey (INT64_MIN) is below every real key and marks "no candidate".
//
// Per row, the candidates that may still be among the k best sit in a buffer of 2k keys above a
// threshold key thr (the k-th best key known; kNoKey at first). A candidate enters only if its
// key beats thr; while thr is a number t, that means score > t (an equal score has a larger
// index: each buffer sees its corpus range in index order), a plain float compare done 16 lanes
// at a time, so a tile row costs one vector compare per 16 scores once the row is warm. A full
// buffer is cut back to its k best with one nth_element (O(k)), which raises thr: amortised O(1)
// per entering candidate instead of a heap's O(log k) (a row of 65536 scores scans 1.2-1.3x
// faster than with std::push_heap at k = 100-1000 on the Zen 5 we measure on). Exclusions are
// looked up (binary search in the row's sorted list) only for the rare candidates that would
// enter; their values are compared, never used as addresses.
//
// CPU only (at::vec::Vectorized, no allocation, no ATen tensors).
#pragma once

#include "fastpref/cpu_capability.h"  // first: before any ATen header

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>

namespace fastpref {
namespace similarity_topk {

constexpr int64_t kNoKey = std::numeric_limits<int64_t>::min();
constexpr int64_t kLowMask = 0xFFFFFFFFLL;  // 2^32 - 1
constexpr int64_t kHigh = int64_t(1) << 32;

inline int64_t key_of(float s, int64_t index) {
  if (s == 0.0f) s = 0.0f;  // -0 ties with +0
  int32_t b;
  std::memcpy(&b, &s, sizeof b);
  const int32_t o =
      std::isnan(s) ? std::numeric_limits<int32_t>::min() : (b < 0 ? (b ^ 0x7FFFFFFF) : b);
  return int64_t(o) * kHigh + (kLowMask - index);  // |o| <= 2^31: no overflow
}

inline int64_t index_of(int64_t key) { return key == kNoKey ? -1 : kLowMask - (key & kLowMask); }

inline float score_of(int64_t key) {
  if (key == kNoKey) return -std::numeric_limits<float>::infinity();
  const int32_t o = int32_t((key - (key & kLowMask)) / kHigh);  // exact: a multiple of 2^32
  if (o == std::numeric_limits<int32_t>::min()) return std::numeric_limits<float>::quiet_NaN();
  const int32_t b = o < 0 ? (o ^ 0x7FFFFFFF) : o;
  float s;
  std::memcpy(&s, &b, sizeof s);
  return s;
}

inline bool excluded(const int64_t* ex, int64_t n_ex, int64_t index) {
  return n_ex > 0 && std::binary_search(ex, ex + n_ex, index);
}

// The candidates of one row: keys[0, size), size <= 2k, every one of them > thr.
struct RowTopK {
  int64_t* keys;  // room for 2k
  int64_t& size;
  int64_t& thr;
  int64_t k;

  // Offers s[0, n) with corpus indices j0 + 0..n-1 (ascending, above every index offered to this
  // row before); ex[0, n_ex) are the row's excluded indices, sorted.
  void offer(const float* s, int64_t n, int64_t j0, const int64_t* ex, int64_t n_ex) {
    using V = at::vec::Vectorized<float>;
    constexpr int kAll = (1 << V::size()) - 1;
    int64_t j = 0;
    while (j < n) {
      const float t = score_of(thr);
      if (thr == kNoKey || std::isnan(t) || j + V::size() > n) {  // warming up, or the tail
        consider(s[j], j0 + j, ex, n_ex);
        ++j;
        continue;
      }
      const int fails = (V::loadu(s + j) > V(t)).zero_mask();  // lanes with s <= t or NaN
      if (fails != kAll) {
        for (int l = 0; l < V::size(); ++l) {
          if (!((fails >> l) & 1)) consider(s[j + l], j0 + j + l, ex, n_ex);
        }
      }
      j += V::size();
    }
  }

  void consider(float s, int64_t index, const int64_t* ex, int64_t n_ex) {
    const int64_t key = key_of(s, index);
    if (key <= thr || excluded(ex, n_ex, index)) return;
    keys[size++] = key;
    if (size == 2 * k) {  // keep the k best; the worst of them is the new threshold
      std::nth_element(keys, keys + k - 1, keys + size, std::greater<int64_t>());
      thr = keys[k - 1];
      size = k;
    }
  }

  // The best min(k, size) keys, descending, at keys[0, returned count).
  int64_t finish() {
    const int64_t n = std::min(k, size);
    std::partial_sort(keys, keys + n, keys + size, std::greater<int64_t>());
    return n;
  }
};

}  // namespace similarity_topk
}  // namespace fastpref
