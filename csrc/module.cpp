// fastpref._C: the Python module that carries the native kernels.
//
// Each kernel file registers its raw ops into the `fastpref_C` torch library with
// TORCH_LIBRARY_FRAGMENT; importing this module runs those registrations. The public,
// differentiable ops (`torch.ops.fastpref.*`) are defined in Python in fastpref/ops/.
#include <torch/extension.h>

TORCH_LIBRARY(fastpref_C, m) {}

namespace fastpref {
std::string cpu_fp32_gemm();  // csrc/cpu/linear_logprobs.cpp
bool cpu_onednn_available();  // csrc/cpu/linear_logprobs.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpref native kernels (registered as torch.ops.fastpref_C.*)";
#ifdef FASTPREF_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_onednn_available", &fastpref::cpu_onednn_available,
        "Whether this torch exports oneDNN's matmul (FASTPREF_CPU_GEMM=onednn can run)");
  m.def("cpu_fp32_gemm", &fastpref::cpu_fp32_gemm,
        "Library behind the CPU kernels' float32 GEMMs: 'onednn', or 'mkl' (ATen's mm) on Intel "
        "processors, where this torch exports no oneDNN matmul, or under FASTPREF_CPU_GEMM=mkl");
}
