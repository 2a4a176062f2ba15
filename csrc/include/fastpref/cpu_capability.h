// cpu_capability.h: which SIMD specialisation of ATen's at::vec::Vectorized the CPU kernels get.
// Include it before any ATen header (the *_math.h headers do so first thing).
#pragma once

// ATen's Vectorized<T> is only the real SIMD type when CPU_CAPABILITY_AVX2/AVX512 is defined
// (ATen defines it per capability for its own kernels); in an extension without it the type is
// the scalar fallback and exp()/tanh() are per-element libm calls (slow, and slower still where
// wide logits make expf take its underflow path). Pick the widest capability this compilation
// targets (-march=native in setup.py) before any ATen header is seen.
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif
