// HARP transforms: the incoherence rotations of a quantized linear at inference.
//
// Shared by both backends: harp_quip/quiptools/transforms.cu is the source of truth and
// harp_qtip/qtip-kernels/transforms.cu a byte copy (harp_qtip/tests/test_mirror.py).
// Plain CUDA C++ with C-ABI launchers (nvcc -arch=sm_90 -c transforms.cu); the torch
// binding is transforms_binding.h, which each backend's extension includes.
// Both kernels work on rows of float32/float16 input, compute in float32, write float32,
// and can fold a per-column scale into the load (SU) and the store (SV).
//
// fwht: y = scale * x H_p on every length-p segment of a row of n = K p (Sylvester
//   order, p a power of two <= kMaxFwht): one CTA per (segment, row), the segment in
//   shared memory, log2(p) butterfly steps (a, b) -> (a + b, a - b) with the pairing of
//   lib/utils/hadamard.py's torch butterfly (the same additions in the same order).
//   QuIP#'s K x K base matrix (K > 1) stays a torch matmul.
//
// rotation_group: several consecutive stages of HARP's StructuredRotation
//   (lib/incoherence/harp.py). A stage of radix b and stride s multiplies, for every
//   index i = c (b s) + j s + r, the b coordinates j of group g = c s + r by the block
//   K_g (b x b): y_d = sum_j K_g[d, j] x_j (or K_g[j, d] for the transposed rotation).
//   Stages whose strides are consecutive digits of the mixed-radix index (s_{t+1} =
//   s_t b_t) only mix the G = prod b_t coordinates i = c (G S) + u S + r, u < G, with S
//   the smallest stride: one CTA loads such a group into shared memory and applies all
//   of its stages there (ping-pong buffers, one barrier per stage), so a rotation is one
//   launch per group of stages instead of three kernels (two permutes, a bmm) per stage.
//   The Python side (lib/linear/transform_kernels.py) splits a rotation into such groups.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace harp_transforms {

constexpr int kMaxStages = 8;       // stages in one rotation group
constexpr int kMaxGroup = 4096;     // coordinates of one rotation group (2 x 16 KB shared)
constexpr int kMaxFwht = 8192;      // FWHT segment length (32 KB shared)
constexpr int kGroupThreads = 256;
constexpr int kFwhtThreads = 512;
constexpr int kErrBadArgument = -1;

struct GroupStages {
  const float* blocks[kMaxStages];  // stage t: (n / radix, radix, radix) float32, row-major
  int radix[kMaxStages];
  int stride[kMaxStages];           // global stride s_t of the stage
  int count;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename XT>
__global__ void __launch_bounds__(kFwhtThreads)
fwht_kernel(const XT* __restrict__ x, float* __restrict__ y, int n, int p, float scale,
            const float* __restrict__ scale_in, const float* __restrict__ scale_out) {
  __shared__ float seg[kMaxFwht];
  const int64_t base = static_cast<int64_t>(blockIdx.y) * n + static_cast<int64_t>(blockIdx.x) * p;
  const int col0 = blockIdx.x * p;
  for (int u = threadIdx.x; u < p; u += blockDim.x) {
    float v = to_float(x[base + u]);
    if (scale_in != nullptr) v *= scale_in[col0 + u];
    seg[u] = v;
  }
  __syncthreads();
  for (int h = 1; h < p; h <<= 1) {
    for (int t = threadIdx.x; t < p / 2; t += blockDim.x) {
      const int i = (t / h) * 2 * h + t % h;
      const float a = seg[i], b = seg[i + h];
      seg[i] = a + b;
      seg[i + h] = a - b;
    }
    __syncthreads();
  }
  for (int u = threadIdx.x; u < p; u += blockDim.x) {
    float v = seg[u] * scale;
    if (scale_out != nullptr) v *= scale_out[col0 + u];
    y[base + u] = v;
  }
}

// grid (n / G, rows); coordinates of group (c, r) = blockIdx.x = (c S + r): c G S + u S + r.
template <typename XT>
__global__ void __launch_bounds__(kGroupThreads)
rotation_group_kernel(const XT* __restrict__ x, float* __restrict__ y, GroupStages st, int n,
                      int S, int G, int transpose, const float* __restrict__ scale_in,
                      const float* __restrict__ scale_out) {
  __shared__ float buf[2][kMaxGroup];
  const int c = blockIdx.x / S, r = blockIdx.x % S;
  const int first = c * G * S + r;
  const int64_t row = static_cast<int64_t>(blockIdx.y) * n;
  for (int u = threadIdx.x; u < G; u += blockDim.x) {
    const int i = first + u * S;
    float v = to_float(x[row + i]);
    if (scale_in != nullptr) v *= scale_in[i];
    buf[0][u] = v;
  }
  __syncthreads();
  int cur = 0;
  for (int t = 0; t < st.count; ++t) {
    const int b = st.radix[t], s = st.stride[t], ls = s / S;
    const float* __restrict__ K = st.blocks[t];
    for (int u = threadIdx.x; u < G; u += blockDim.x) {
      const int i = first + u * S;
      const int d = (u / ls) % b;
      const int u0 = u - d * ls;
      const float* block = K + static_cast<int64_t>((i / (b * s)) * s + i % s) * b * b;
      const float* coef = transpose ? block + d : block + d * b;
      const int step = transpose ? b : 1;
      float acc = 0.0f;
      for (int j = 0; j < b; ++j) acc += coef[j * step] * buf[cur][u0 + j * ls];
      buf[cur ^ 1][u] = acc;
    }
    __syncthreads();
    cur ^= 1;
  }
  for (int u = threadIdx.x; u < G; u += blockDim.x) {
    const int i = first + u * S;
    float v = buf[cur][u];
    if (scale_out != nullptr) v *= scale_out[i];
    y[row + i] = v;
  }
}

int threads_for(int work, int cap) {
  const int warps = (work + 31) / 32;
  const int threads = 32 * (warps < 1 ? 1 : warps);
  return threads < cap ? threads : cap;
}

}  // namespace harp_transforms

extern "C" {

const char* harp_transforms_error_string(int error) {
  if (error == harp_transforms::kErrBadArgument) return "invalid launcher argument";
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

// y (rows, n) fp32 = scale * per-segment FWHT of x (rows, n), n = K p, p a power of two
// <= 8192; x fp32 (x_half = 0) or fp16; scale_in / scale_out: n floats or null.
int harp_fwht(const void* x, int x_half, float* y, int rows, int n, int p, float scale,
                   const float* scale_in, const float* scale_out, void* stream) {
  using namespace harp_transforms;
  if (rows < 0 || p < 1 || p > kMaxFwht || (p & (p - 1)) != 0 || n % p != 0 || n / p > 65535)
    return kErrBadArgument;
  if (rows == 0 || n == 0) return 0;
  if (rows > 65535) return kErrBadArgument;
  const dim3 grid(n / p, rows);
  const int threads = threads_for(p / 2, kFwhtThreads);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (x_half)
    fwht_kernel<__half><<<grid, threads, 0, s>>>(static_cast<const __half*>(x), y, n, p, scale,
                                                 scale_in, scale_out);
  else
    fwht_kernel<float><<<grid, threads, 0, s>>>(static_cast<const float*>(x), y, n, p, scale,
                                                scale_in, scale_out);
  return static_cast<int>(cudaGetLastError());
}

// y (rows, n) fp32 = the `count` stages (blocks[t], radix[t], stride[t], in application
// order) applied to x (rows, n); their strides must be the consecutive digits S, S b, ...
// of one group of G = prod radix <= 4096 coordinates (any order of application).
int harp_rotation_group(const void* x, int x_half, float* y, int rows, int n,
                        const float* const* blocks, const int* radix, const int* stride,
                        int count, int transpose, const float* scale_in,
                        const float* scale_out, void* stream) {
  using namespace harp_transforms;
  if (rows < 0 || n < 1 || count < 1 || count > kMaxStages) return kErrBadArgument;
  GroupStages st;
  st.count = count;
  int S = stride[0], G = 1;
  for (int t = 0; t < count; ++t) {
    if (radix[t] < 1 || stride[t] < 1 || blocks[t] == nullptr) return kErrBadArgument;
    st.blocks[t] = blocks[t];
    st.radix[t] = radix[t];
    st.stride[t] = stride[t];
    S = stride[t] < S ? stride[t] : S;
    if (G > kMaxGroup / radix[t]) return kErrBadArgument;
    G *= radix[t];
  }
  if (n % (G * S) != 0) return kErrBadArgument;
  for (int t = 0; t < count; ++t)
    if (stride[t] % S != 0 || G % (stride[t] / S * radix[t]) != 0) return kErrBadArgument;
  if (rows == 0) return 0;
  if (rows > 65535) return kErrBadArgument;
  const dim3 grid(n / G, rows);
  const int threads = threads_for(G, kGroupThreads);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (x_half)
    rotation_group_kernel<__half><<<grid, threads, 0, s>>>(
        static_cast<const __half*>(x), y, st, n, S, G, transpose, scale_in, scale_out);
  else
    rotation_group_kernel<float><<<grid, threads, 0, s>>>(
        static_cast<const float*>(x), y, st, n, S, G, transpose, scale_in, scale_out);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
