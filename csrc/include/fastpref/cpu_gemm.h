// cpu_gemm.h: the tile GEMMs of the CPU kernels (csrc/cpu/linear_logprobs.cpp,
// csrc/cpu/similarity_topk.cpp), one choice of library for both: oneDNN for fp32 where this
// torch exports it, ATen's mm otherwise. Include after the ATen headers.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

// ATen's oneDNN matmul (result = beta * result + alpha * mat1 @ mat2 on strided tensors). It is
// exported by libtorch_cpu but has no installed header, so it is declared here, weak: against a
// torch that lacks it the address is null and the kernel keeps ATen's own mm (see Gemm).
namespace at::native {
__attribute__((weak)) void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2,
                                         const Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace fastpref {

// True when this torch exports oneDNN's matmul and was built with oneDNN.
inline bool onednn_available() {
  return &at::native::mkldnn_matmul != nullptr && at::hasMKLDNN();
}

// True on an Intel processor (CPUID vendor "GenuineIntel"), read once.
inline bool intel_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool intel = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid(0, &a, &b, &c, &d) == 0) return false;
    char vendor[13];
    std::memcpy(vendor, &b, 4);
    std::memcpy(vendor + 4, &d, 4);
    std::memcpy(vendor + 8, &c, 4);
    vendor[12] = '\0';
    return std::strcmp(vendor, "GenuineIntel") == 0;
  }();
  return intel;
#else
  return false;
#endif
}

// Which library runs the fp32 tile GEMMs. ATen's fp32 mm is MKL's sgemm, and MKL takes its
// AVX2 kernels on AMD processors: 190-215 GFLOP/s on the 2-core Zen 5 we measure on, against
// 370-450 GFLOP/s for oneDNN's AVX-512 brgemm on the same tiles, in full fp32 (no bf16 or
// tf32 shortcuts). On Intel processors MKL runs its AVX-512 kernels and is the faster of the
// two (2-core Xeon with AMX, 2048^3: MKL 206 against oneDNN 182 GFLOP/s; the backbone's shapes
// 185-204 against 158-171; bench/README.md), so there fp32 stays with ATen's mm. bf16 mm goes
// to oneDNN inside ATen either way; float64 stays with MKL.
// FASTPREF_CPU_GEMM=mkl forces ATen's mm for fp32, =onednn insists on oneDNN (unset: oneDNN
// where available, except on Intel processors); read once per kernel call.
struct Gemm {
  bool onednn;
  int64_t pad;  // rows of the last row block are padded to a multiple of this (see rows_for)
  explicit Gemm(at::ScalarType dtype) {
    const char* env = std::getenv("FASTPREF_CPU_GEMM");
    const std::string choice = env == nullptr ? "" : env;
    TORCH_CHECK(choice.empty() || choice == "mkl" || choice == "onednn",
                "FASTPREF_CPU_GEMM must be 'onednn' or 'mkl' (or unset), got '", choice, "'");
    const bool available = onednn_available();
    TORCH_CHECK(choice != "onednn" || available,
                "FASTPREF_CPU_GEMM=onednn, but this torch exports no at::native::mkldnn_matmul "
                "(or was built without oneDNN); unset it to use ATen's mm");
    const bool wanted = choice == "onednn" || (choice.empty() && !intel_cpu());
    onednn = dtype == at::kFloat && wanted && available;
    // oneDNN builds and caches a primitive (~1 MB) for every GEMM shape it meets, and the rows
    // of the last row block change with every batch: new shapes every batch would grow the
    // cache by 2-3 MB a step. Padded with zero rows to a multiple of 64, a run meets a handful of
    // shapes (at most 8 row counts) for at most 63 rows of extra work. ATen sends bf16 to
    // oneDNN too; MKL's sgemm/dgemm keep no such state and are left unpadded.
    pad = (onednn || dtype == at::kBFloat16) ? 64 : 1;
  }
  // Total rows once the last of the NB-row blocks is padded.
  int64_t rows_for(int64_t N, int64_t NB) const {
    const int64_t full = N / NB * NB, rest = N - full;
    return full + (rest + pad - 1) / pad * pad;
  }
  // H with zero rows appended up to Np (H itself when nothing is padded).
  static at::Tensor padded(const at::Tensor& H, int64_t Np) {
    if (Np == H.size(0)) return H;
    at::Tensor out = at::zeros({Np, H.size(1)}, H.options());
    out.narrow(0, 0, H.size(0)).copy_(H);
    return out;
  }
  // out = a @ b, or out += a @ b when accumulate
  void operator()(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                  bool accumulate = false) const {
    if (onednn) {
      at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
    } else if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  }
};

}  // namespace fastpref
