// listwise.cu: the fused listwise ranking losses of fastpref.listwise_loss on CUDA.
//
// Fused: per list, the loss and d loss / d scores in one kernel; the B x K x K pair tensor is
// never materialised and nothing waits on the host (no .item(), no device synchronisation:
// launches and cudaGetLastError only), so the op is safe inside CUDA graphs and overlapped
// streams.
//   ranknet / lambda / lipo: one block per list, one thread per item (K <= kMaxK = 1024). The
//     list is staged in shared memory; thread i computes its per-item weight inputs (rank by
//     score, gold rank, ideal-DCG term, O(K)), a block reduction gives the IDCG, then thread i
//     sweeps j for the pairs it wins (loss) and its full gradient (both directions), so no thread
//     writes another's output and no atomics are needed. Shared memory: O(K) per block.
//   listnet / listmle: one thread per list (a short sequential scan each); ListMLE's order and
//     reverse running log-sum-exps live in an O(B*K) workspace the caller provides.
// Numerics: all arithmetic is listwise_math.h, the same functions the C++ CPU kernels run
// (and the CPU tests check, including this kernel's per-item schedule through
// fastpref_C::listwise_fwd_itemwise).
//
// Layout: the kernels and a plain C launcher below compile with nvcc against this header and
// the CUDA runtime alone (the test suite compiles them for sm_80 and sm_90); the ATen/torch
// glue at the end is compiled only inside a torch extension build (setup.py defines
// TORCH_API_INCLUDE_EXTENSION_H) and can be switched off with -DFASTPREF_CUDA_STANDALONE.
#include <cuda_runtime.h>

#include "fastpref/listwise_math.h"

namespace fastpref {
namespace listwise {

constexpr int kMaxK = 1024;  // one thread per item in one block
constexpr int kListThreads = 128;

// Block-wide sum of red[0..blockDim.x) (a power of two); every thread gets the result.
template <typename T>
__device__ T block_sum(T* red, T v) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  T total = red[0];
  __syncthreads();  // red is reused by the next reduction
  return total;
}

template <typename T>
__global__ void listwise_pairwise_kernel(const T* __restrict__ scores,
                                         const T* __restrict__ relevance,
                                         const bool* __restrict__ mask, int K, int kind,
                                         int weighting, T sigma, T* __restrict__ loss,
                                         T* __restrict__ grad) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ItemPrep<T>* prep = reinterpret_cast<ItemPrep<T>*>(smem_raw);  // [K]
  T* s = reinterpret_cast<T*>(prep + K);                          // [K]
  T* r = s + K;                                                   // [K]
  T* red = r + K;                                                 // [blockDim.x]
  bool* m_sh = reinterpret_cast<bool*>(red + blockDim.x);         // [K]
  const long long b = blockIdx.x;
  const int i = threadIdx.x;
  if (i < K) {
    s[i] = scores[b * K + i];
    r[i] = relevance[b * K + i];
    if (mask != nullptr) m_sh[i] = mask[b * K + i];
  }
  __syncthreads();
  const bool* m = mask != nullptr ? m_sh : nullptr;
  const T n_real = block_sum(red, (i < K && real_item(m, i)) ? T(1) : T(0));
  if (n_real < T(2)) {  // uniform over the block: every thread leaves here together
    if (i < K) grad[b * K + i] = T(0);
    if (i == 0) loss[b] = T(0);
    return;
  }
  ItemPrep<T> p;
  if (i < K) {
    p = prep_item<T>(i, K, s, r, m, kind, weighting);
    prep[i] = p;
  }
  const T idcg = block_sum(red, (i < K && real_item(m, i)) ? p.ideal_term : T(0));
  const T inv_idcg = inv_ideal_dcg(idcg);
  T li = T(0), gi = T(0);
  if (i < K) {
    pairwise_item(i, K, s, r, m, prep, kind, weighting, sigma, inv_idcg, &li, &gi);
    grad[b * K + i] = gi;
  }
  const T total = block_sum(red, li);
  if (i == 0) loss[b] = total;
}

template <typename T>
__global__ void listwise_list_kernel(const T* __restrict__ scores,
                                     const T* __restrict__ relevance,
                                     const bool* __restrict__ mask, int B, int K, int kind,
                                     T sigma, int* __restrict__ perm_ws, T* __restrict__ cum_ws,
                                     T* __restrict__ loss, T* __restrict__ grad) {
  const long long b = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const T* s = scores + b * K;
  const T* r = relevance + b * K;
  const bool* m = mask != nullptr ? mask + b * K : nullptr;
  T* g = grad + b * K;
  if (count_real<T>(K, m) < 2) {
    for (int j = 0; j < K; ++j) g[j] = T(0);
    loss[b] = T(0);
    return;
  }
  if (kind == LISTNET) {
    loss[b] = listnet_list(K, s, r, m, sigma, g);
  } else {
    loss[b] = listmle_list(K, s, r, m, sigma, perm_ws + b * K, cum_ws + b * K, g);
  }
}

// Plain launcher: no torch, no allocation, no synchronisation. perm_ws [B*K] and cum_ws [B*K]
// are needed only for kind == LISTMLE (may be null otherwise). Returns the launch status.
template <typename T>
cudaError_t listwise_launch(const T* scores, const T* relevance, const bool* mask, int B, int K,
                            int kind, int weighting, T sigma, T* loss, T* grad, int* perm_ws,
                            T* cum_ws, cudaStream_t stream) {
  if (B <= 0 || K <= 0) return cudaSuccess;
  if (K > kMaxK || kind < RANKNET || kind > LIPO) return cudaErrorInvalidValue;
  if (is_pairwise(kind)) {
    int threads = 32;
    while (threads < K) threads *= 2;
    const size_t smem = static_cast<size_t>(K) * (sizeof(ItemPrep<T>) + 2 * sizeof(T) + 1) +
                        static_cast<size_t>(threads) * sizeof(T);
    if (smem > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(listwise_pairwise_kernel<T>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    listwise_pairwise_kernel<T><<<B, threads, smem, stream>>>(scores, relevance, mask, K, kind,
                                                              weighting, sigma, loss, grad);
  } else {
    if (kind == LISTMLE && (perm_ws == nullptr || cum_ws == nullptr)) return cudaErrorInvalidValue;
    const int blocks = (B + kListThreads - 1) / kListThreads;
    listwise_list_kernel<T><<<blocks, kListThreads, 0, stream>>>(
        scores, relevance, mask, B, K, kind, sigma, perm_ws, cum_ws, loss, grad);
  }
  return cudaGetLastError();
}

}  // namespace listwise
}  // namespace fastpref

extern "C" cudaError_t fastpref_listwise_launch_f32(const float* scores, const float* relevance,
                                                    const bool* mask, int B, int K, int kind,
                                                    int weighting, float sigma, float* loss,
                                                    float* grad, int* perm_ws, float* cum_ws,
                                                    cudaStream_t stream) {
  return fastpref::listwise::listwise_launch<float>(scores, relevance, mask, B, K, kind,
                                                    weighting, sigma, loss, grad, perm_ws,
                                                    cum_ws, stream);
}

extern "C" cudaError_t fastpref_listwise_launch_f64(const double* scores,
                                                    const double* relevance, const bool* mask,
                                                    int B, int K, int kind, int weighting,
                                                    double sigma, double* loss, double* grad,
                                                    int* perm_ws, double* cum_ws,
                                                    cudaStream_t stream) {
  return fastpref::listwise::listwise_launch<double>(scores, relevance, mask, B, K, kind,
                                                     weighting, sigma, loss, grad, perm_ws,
                                                     cum_ws, stream);
}

#if defined(TORCH_API_INCLUDE_EXTENSION_H) && !defined(FASTPREF_CUDA_STANDALONE)
// ---- ATen glue: input checks, allocation, stream, registration ------------------------------
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

std::tuple<at::Tensor, at::Tensor> listwise_fwd_cuda(const at::Tensor& scores_in,
                                                     const at::Tensor& relevance_in,
                                                     const std::optional<at::Tensor>& mask_in,
                                                     int64_t kind, int64_t weighting,
                                                     double sigma) {
  using namespace fastpref::listwise;
  TORCH_CHECK(scores_in.is_cuda(), "listwise_loss: scores must be a CUDA tensor");
  TORCH_CHECK(scores_in.dim() == 2, "listwise_loss: scores must be [B, K], got ",
              scores_in.sizes());
  TORCH_CHECK(relevance_in.sizes() == scores_in.sizes(),
              "listwise_loss: relevance must be [B, K] = ", scores_in.sizes(), ", got ",
              relevance_in.sizes());
  TORCH_CHECK(scores_in.scalar_type() == at::kFloat || scores_in.scalar_type() == at::kDouble,
              "listwise_loss: the raw kernel takes float32/float64 scores, got ",
              scores_in.scalar_type());
  TORCH_CHECK(relevance_in.scalar_type() == scores_in.scalar_type(),
              "listwise_loss: relevance must have the dtype of scores");
  TORCH_CHECK(scores_in.size(1) <= kMaxK, "listwise_loss: scores has K=", scores_in.size(1),
              " items per list, beyond the CUDA kernel's limit of ", kMaxK,
              " (one thread per item); use the triton backend");
  TORCH_CHECK(kind >= RANKNET && kind <= LIPO, "listwise_loss: unknown kind code ", kind);
  TORCH_CHECK(weighting == WEIGHT_NONE || weighting == WEIGHT_FIRST,
              "listwise_loss: unknown weighting code ", weighting);
  TORCH_CHECK(sigma > 0, "listwise_loss: sigma must be positive, got ", sigma);
  c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor relevance = relevance_in.contiguous();
  at::Tensor mask;
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->sizes() == scores.sizes() && mask_in->scalar_type() == at::kBool,
                "listwise_loss: mask must be a bool [B, K] tensor");
    mask = mask_in->contiguous();
  }
  const int64_t B = scores.size(0);
  const int64_t K = scores.size(1);
  TORCH_CHECK(B <= INT32_MAX, "listwise_loss: B=", B, " lists is beyond the grid limit");
  at::Tensor loss = at::empty({B}, scores.options());
  at::Tensor grad = at::empty({B, K}, scores.options());
  at::Tensor perm, cum;
  if (kind == LISTMLE) {
    perm = at::empty({B, K}, scores.options().dtype(at::kInt));
    cum = at::empty({B, K}, scores.options());
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool* m = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  cudaError_t err;
  if (scores.scalar_type() == at::kFloat) {
    err = fastpref_listwise_launch_f32(
        scores.const_data_ptr<float>(), relevance.const_data_ptr<float>(), m, B, K, kind,
        weighting, static_cast<float>(sigma), loss.mutable_data_ptr<float>(),
        grad.mutable_data_ptr<float>(), perm.defined() ? perm.mutable_data_ptr<int>() : nullptr,
        cum.defined() ? cum.mutable_data_ptr<float>() : nullptr, stream);
  } else {
    err = fastpref_listwise_launch_f64(
        scores.const_data_ptr<double>(), relevance.const_data_ptr<double>(), m, B, K, kind,
        weighting, sigma, loss.mutable_data_ptr<double>(), grad.mutable_data_ptr<double>(),
        perm.defined() ? perm.mutable_data_ptr<int>() : nullptr,
        cum.defined() ? cum.mutable_data_ptr<double>() : nullptr, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "listwise_loss: CUDA launch failed: ", cudaGetErrorString(err));
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpref_C, CUDA, m) { m.impl("listwise_fwd", &listwise_fwd_cuda); }
#endif  // TORCH_API_INCLUDE_EXTENSION_H && !FASTPREF_CUDA_STANDALONE
