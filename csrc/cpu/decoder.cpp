// A decoder layer's elementwise ops on the CPU in one pass each: RMSNorm forward/backward and
// SwiGLU forward/backward (the arithmetic, its paper and its roundings: decoder_math.h).
//
// Why: transformers' LlamaRMSNorm is five ATen ops whose autograd backward is nine more, and
// LlamaMLP's `act_fn(gate) * up` three plus their backward; on the 2-core VMs these passes over
// [tokens, hidden] tensors cost more than the GEMMs they sit between would at a small hidden size
// (bench/README.md, the step breakdown). Here each is one pass over its inputs.
//
// SwiGLU takes the fused gate/up projection's output, [N, 2 I] with gate | up in each row (one
// GEMM for both, as Phi-3's gate_up_proj), and its backward writes the gradient in that layout,
// the one the fused projection's backward GEMMs take.
//
// Threads: at::parallel_for over rows. The weight gradient of
// RMSNorm is summed per block of rows into its own fp32 accumulator, the blocks fixed by the
// thread count (not by scheduling), then added in block order: deterministic for a thread count.
// Memory beyond inputs and outputs: [blocks, D] fp32 for dw.

#include "fastpref/decoder_math.h"  // first: it picks the SIMD capability

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace fastpref {
namespace {

// float32 or bfloat16 (the checks reject the rest): f(scalar_t{}) with the element type.
template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  if (t == at::kFloat) {
    f(float{});
  } else {
    f(c10::BFloat16{});
  }
}

void check_float_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_rms(const at::Tensor& x, const at::Tensor& w, const char* op) {
  check_float_cpu(x, op, "x");
  check_float_cpu(w, op, "weight");
  TORCH_CHECK(x.dim() == 2, op, ": x must be [N, D], got ", x.sizes());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), op, ": weight must be [D] = [", x.size(1),
              "], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": weight (", w.scalar_type(),
              ") and x (", x.scalar_type(), ") must have the same dtype");
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& w,
                                                    double eps) {
  check_rms(x, w, "rms_norm_fwd");
  TORCH_CHECK(eps >= 0.0, "rms_norm_fwd: eps must be >= 0, got ", eps);
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {y, rstd};
  float* r = rstd.data_ptr<float>();
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)),
                     [&](int64_t lo, int64_t hi) {
                       for (int64_t i = lo; i < hi; ++i) {
                         r[i] = decoder::rms_norm_row(xp + i * D, wp, yp + i * D, D,
                                                      static_cast<float>(eps));
                       }
                     });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& g, const at::Tensor& x,
                                                    const at::Tensor& w,
                                                    const at::Tensor& rstd) {
  check_rms(x, w, "rms_norm_bwd");
  check_float_cpu(g, "rms_norm_bwd", "grad");
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "rms_norm_bwd: grad ", g.sizes(), " ", g.scalar_type(), " must match x ", x.sizes(),
              " ", x.scalar_type());
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.dim() == 1 && rstd.size(0) == x.size(0) &&
                  rstd.is_contiguous() && rstd.device().is_cpu(),
              "rms_norm_bwd: rstd must be contiguous float32 [N] = [", x.size(0), "], got ",
              rstd.scalar_type(), " ", rstd.sizes());
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor dx = at::empty_like(x);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
  at::Tensor acc = at::zeros({blocks, D}, x.options().dtype(at::kFloat));
  const float* r = rstd.data_ptr<float>();
  float* accp = acc.data_ptr<float>();
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t blo, int64_t bhi) {
      for (int64_t b = blo; b < bhi; ++b) {
        const int64_t lo = N * b / blocks, hi = N * (b + 1) / blocks;
        for (int64_t i = lo; i < hi; ++i) {
          decoder::rms_norm_row_backward(gp + i * D, xp + i * D, wp, r[i], dxp + i * D,
                                         accp + b * D, D);
        }
      }
    });
  });
  at::Tensor dw = acc.sum(0);  // block order: the same for the same thread count
  return {dx, dw.to(w.scalar_type())};
}

void check_swiglu(const at::Tensor& gu, const char* op) {
  check_float_cpu(gu, op, "gate_up");
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0, op,
              ": gate_up must be [N, 2 I] (gate | up), got ", gu.sizes());
}

// rows per task: ~16k elements of h
int64_t row_grain(int64_t I) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)); }

at::Tensor swiglu_fwd_cpu(const at::Tensor& gu) {
  check_swiglu(gu, "swiglu_fwd");
  const int64_t N = gu.size(0), I = gu.size(1) / 2;
  at::Tensor h = at::empty({N, I}, gu.options());
  dispatch(gu.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* p = gu.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(I), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        decoder::swiglu_run(p + i * 2 * I, p + i * 2 * I + I, hp + i * I, I);
      }
    });
  });
  return h;
}

at::Tensor swiglu_bwd_cpu(const at::Tensor& g, const at::Tensor& gu) {
  check_swiglu(gu, "swiglu_bwd");
  check_float_cpu(g, "swiglu_bwd", "grad");
  const int64_t N = gu.size(0), I = gu.size(1) / 2;
  TORCH_CHECK(g.dim() == 2 && g.size(0) == N && g.size(1) == I &&
                  g.scalar_type() == gu.scalar_type(),
              "swiglu_bwd: grad must be [N, I] = [", N, ", ", I, "] ", gu.scalar_type(),
              ", got ", g.sizes(), " ", g.scalar_type());
  at::Tensor dgu = at::empty_like(gu);
  dispatch(gu.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* p = gu.data_ptr<scalar_t>();
    scalar_t* dp = dgu.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(I), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t r = i * 2 * I;
        decoder::swiglu_run_backward(gp + i * I, p + r, p + r + I, dp + r, dp + r + I, I);
      }
    });
  });
  return dgu;
}

}  // namespace
}  // namespace fastpref

TORCH_LIBRARY_FRAGMENT(fastpref_C, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("swiglu_fwd(Tensor gate_up) -> Tensor");
  m.def("swiglu_bwd(Tensor grad, Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastpref_C, CPU, m) {
  m.impl("rms_norm_fwd", &fastpref::rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &fastpref::rms_norm_bwd_cpu);
  m.impl("swiglu_fwd", &fastpref::swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &fastpref::swiglu_bwd_cpu);
}
