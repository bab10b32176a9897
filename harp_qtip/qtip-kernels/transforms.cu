// HARP transforms: the incoherence rotations of a quantized linear at inference.
//
// Shared by both backends: harp_quip/quiptools/transforms.cu is the source of truth and
// harp_qtip/qtip-kernels/transforms.cu a byte copy (harp_qtip/tests/test_mirror.py).
// Plain CUDA C++ with C-ABI launchers (nvcc -arch=sm_90 -c transforms.cu); the torch
// binding is transforms_binding.h, which each backend's extension includes.
// Both kernels work on rows of float32/float16 input, compute in float32, write float32 or
// float16, and can fold a per-column scale into the load (SU) and the store (SV). Both are
// programmatic dependent launches (dependent_launch.cuh): the base matrix or the blocks
// load, and the scales start toward L1, before the kernel waits for its input rows.
//
// hadamard: y = scale_out * (B (x) H_p) (scale * (scale_in * x)) on every row of n = K p
//   (QuIP#'s normalized Hadamard: p a power of two in Sylvester order, B the K x K base
//   matrix, none for K = 1), in one launch. K = 1: one CTA per row holds it in shared
//   memory and runs the FWHT radix 8 in registers (three butterfly steps per barrier,
//   the pairing of lib/utils/hadamard.py's torch butterfly: the same additions in the
//   same order). K > 1: B (x) H_p = (I (x) H_p)(B (x) I), so the CTAs of a row split it
//   by output segment: each reads the whole row, forms its segments sum_b B[a, b] x_b
//   and runs their FWHT (the torch path multiplies by B after the FWHT: the same sums
//   in another order). The output is float32 or float16 (the cast of the torch path).
//
// rotation_group: several consecutive stages of HARP's StructuredRotation
//   (lib/incoherence/harp.py). A stage of radix b and stride s multiplies, for every
//   index i = c (b s) + j s + r, the b coordinates j of group g = c s + r by the block
//   K_g (b x b): y_d = sum_j K_g[d, j] x_j (or K_g[j, d] for the transposed rotation).
//   Stages whose strides are consecutive digits of the mixed-radix index (s_{t+1} =
//   s_t b_t) only mix the G = prod b_t coordinates i = c (G S) + u S + r, u < G, with S
//   the smallest stride: one CTA loads such a group into shared memory (with its blocks
//   when they fit in 64 KB, copied asynchronously so that all of their loads are in
//   flight at once) and applies all of its stages there (ping-pong buffers, one barrier
//   per stage), so a rotation is one launch per group of stages instead of three kernels
//   (two permutes, a bmm) per stage.
//   The Python side (lib/linear/transform_kernels.py) splits a rotation into such groups.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "dependent_launch.cuh"

namespace harp_transforms {

constexpr int kMaxStages = 8;       // stages in one rotation group
constexpr int kMaxGroup = 4096;     // coordinates of one rotation group (2 x 16 KB shared)
constexpr int kMaxCachedBlocks = 16384;  // block floats a rotation group CTA copies to shared
constexpr int kMaxHadamard = 32768;  // row length of the hadamard kernel (128 KB shared)
constexpr int kMaxBaseShared = 8192; // base-matrix floats one hadamard CTA keeps (32 KB)
constexpr int kBaseOutputs = 256;    // outputs of the base product per hadamard CTA (about)
constexpr int kGroupThreads = 256;
constexpr int kHadamardThreads = 1024;
constexpr int kLoadUnroll = 8;      // loads in flight per thread in the row loops
constexpr int kErrBadArgument = -1;

struct GroupStages {
  const float* blocks[kMaxStages];  // stage t: (n / radix, radix, radix) float32, row-major
  int radix[kMaxStages];
  int stride[kMaxStages];           // global stride s_t of the stage
  int count;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

// R butterfly steps of the FWHT on seg (n floats), at distances h, 2h, ..., 2^(R-1) h with
// h = 2^log_h: each thread takes 2^R values at stride h into registers.
template <int R>
__device__ __forceinline__ void fwht_steps(float* seg, int n, int log_h) {
  constexpr int kSize = 1 << R;
  const int h = 1 << log_h;
  for (int t = threadIdx.x; t < (n >> R); t += blockDim.x) {
    const int first = ((t >> log_h) << (log_h + R)) + (t & (h - 1));
    float v[kSize];
#pragma unroll
    for (int j = 0; j < kSize; ++j) v[j] = seg[first + j * h];
#pragma unroll
    for (int d = 1; d < kSize; d <<= 1) {
#pragma unroll
      for (int j = 0; j < kSize; ++j) {
        if ((j & d) == 0) {
          const float a = v[j], b = v[j + d];
          v[j] = a + b;
          v[j + d] = a - b;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kSize; ++j) seg[first + j * h] = v[j];
  }
  __syncthreads();
}

// Pull p[u S] (u < count; p optional) toward this SM's L1 ahead of use. Issued before
// wait_for_predecessor, the DRAM latency of the per-column scales overlaps the
// predecessor's tail instead of following it.
__device__ __forceinline__ void prefetch_l1(const float* p, int count, int S = 1) {
  if (p == nullptr) return;
  for (int u = threadIdx.x; u < count; u += blockDim.x)
    asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p + static_cast<int64_t>(u) * S));
}

// dst[u] = scale[u S] * src[u S] (scale optional) for u < count, as float: each thread
// issues kLoadUnroll loads (predicated, no branches) before it uses any.
template <typename XT>
__device__ __forceinline__ void load_scaled(const XT* __restrict__ src,
                                            const float* __restrict__ scale, float* dst,
                                            int count, int S = 1) {
  for (int u0 = threadIdx.x; u0 < count; u0 += kLoadUnroll * blockDim.x) {
    float v[kLoadUnroll], f[kLoadUnroll];
#pragma unroll
    for (int i = 0; i < kLoadUnroll; ++i) {
      const int u = u0 + i * blockDim.x;
      v[i] = u < count ? to_float(src[u * S]) : 0.0f;
      f[i] = u < count && scale != nullptr ? scale[u * S] : 1.0f;
    }
#pragma unroll
    for (int i = 0; i < kLoadUnroll; ++i) {
      const int u = u0 + i * blockDim.x;
      if (u < count) dst[u] = scale != nullptr ? v[i] * f[i] : v[i];
    }
  }
}

// dst[u S] = scale[u S] * (factor * src[u]) (scale optional) for u < count, src in shared
// memory.
template <typename YT>
__device__ __forceinline__ void store_scaled(const float* src, float factor,
                                             const float* __restrict__ scale,
                                             YT* __restrict__ dst, int count, int S = 1) {
  for (int u0 = threadIdx.x; u0 < count; u0 += kLoadUnroll * blockDim.x) {
    float f[kLoadUnroll];
#pragma unroll
    for (int i = 0; i < kLoadUnroll; ++i) {
      const int u = u0 + i * blockDim.x;
      f[i] = u < count && scale != nullptr ? scale[u * S] : 1.0f;
    }
#pragma unroll
    for (int i = 0; i < kLoadUnroll; ++i) {
      const int u = u0 + i * blockDim.x;
      if (u < count) {
        const float v = src[u] * factor;
        store(dst + u * S, scale != nullptr ? v * f[i] : v);
      }
    }
  }
}

// grid (ceil(K / base_rows), rows); CTA x writes output segments a0 .. a0 + base_rows - 1.
// (B (x) H_p) = (I (x) H_p)(B (x) I): a CTA forms its segments z_a = sum_b B[a, b] x_b
// from the whole row, then runs their FWHT.
template <typename XT, typename YT>
__global__ void __launch_bounds__(kHadamardThreads)
hadamard_kernel(const XT* __restrict__ x, YT* __restrict__ y, int n, int log_p, int k,
                const float* __restrict__ base, int base_rows, float scale,
                const float* __restrict__ scale_in, const float* __restrict__ scale_out) {
  extern __shared__ float shared[];
  const int p = 1 << log_p;
  const int64_t row = static_cast<int64_t>(blockIdx.y) * n;
  const int a0 = blockIdx.x * base_rows;
  const int a_count = min(base_rows, k - a0);
  const int outputs = a_count * p;
  float* work = shared;  // this CTA's output segments (k = 1: the whole row)
  harp_launch::allow_dependents();
  prefetch_l1(scale_in, n);
  prefetch_l1(scale_out == nullptr ? nullptr : scale_out + a0 * p, outputs);
  if (base == nullptr) {
    harp_launch::wait_for_predecessor();
    load_scaled(x + row, scale_in, work, n);
  } else {
    float* coef = shared + base_rows * p;   // this CTA's rows of B
    float* whole = coef + base_rows * k;    // the whole row
    load_scaled(base + a0 * k, static_cast<const float*>(nullptr), coef, a_count * k);
    harp_launch::wait_for_predecessor();
    load_scaled(x + row, scale_in, whole, n);
    __syncthreads();
    for (int o = threadIdx.x; o < outputs; o += blockDim.x) {
      const float* b_row = coef + (o >> log_p) * k;
      const float* column = whole + (o & (p - 1));
      float acc = 0.0f;
#pragma unroll 4
      for (int b = 0; b < k; ++b) acc = fmaf(b_row[b], column[b * p], acc);
      work[o] = acc;
    }
  }
  __syncthreads();
  for (int log_h = 0; log_h < log_p;) {
    const int steps = min(3, log_p - log_h);
    if (steps == 3) fwht_steps<3>(work, outputs, log_h);
    else if (steps == 2) fwht_steps<2>(work, outputs, log_h);
    else fwht_steps<1>(work, outputs, log_h);
    log_h += steps;
  }
  const int first = a0 * p;
  store_scaled(work, scale, scale_out == nullptr ? nullptr : scale_out + first, y + row + first,
               outputs);
}

// Asynchronous global -> shared copies (cp.async): all of a CTA's block loads in flight at
// once, while it loads its coordinates.
__device__ __forceinline__ void copy_async(float* dst, const float* src, bool sixteen_bytes) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if (sixteen_bytes)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src));
}

__device__ __forceinline__ void copy_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::);
}

// grid (n / G, rows); coordinates of group (c, r) = blockIdx.x = (c S + r): i = c G S + u S + r.
// With U = c G + u and ls = s / S, stage (b, s) uses block S q + r, q = (U / (b ls)) ls +
// U mod ls: the CTA's blocks are q = q0 .. q0 + G / b - 1, q0 = c G / b. When they fit
// (cache_blocks) they are copied to shared memory first, all stages at once.
template <typename XT, typename YT>
__global__ void __launch_bounds__(kGroupThreads)
rotation_group_kernel(const XT* __restrict__ x, YT* __restrict__ y, GroupStages st, int n,
                      int S, int G, int transpose, int cache_blocks,
                      const float* __restrict__ scale_in, const float* __restrict__ scale_out) {
  extern __shared__ __align__(16) float shared[];
  float* in = shared;  // ping-pong buffers: the stage's input and output
  float* out = shared + G;
  float* cached = shared + ((2 * G + 3) & ~3);
  const int c = blockIdx.x / S, r = blockIdx.x % S;
  const int first = c * G * S + r;
  const int64_t row = static_cast<int64_t>(blockIdx.y) * n;
  harp_launch::allow_dependents();
  prefetch_l1(scale_in == nullptr ? nullptr : scale_in + first, G, S);
  prefetch_l1(scale_out == nullptr ? nullptr : scale_out + first, G, S);
  if (cache_blocks) {
    int offset = 0;
    for (int t = 0; t < st.count; ++t) {
      const int b = st.radix[t], bb = b * b, q0 = c * (G / b);
      const bool vector = bb % 4 == 0 && offset % 4 == 0 &&
                          reinterpret_cast<uintptr_t>(st.blocks[t]) % 16 == 0;
      const int step = vector ? 4 : 1;
      for (int e = threadIdx.x * step; e < G * b; e += blockDim.x * step) {
        const int lq = e / bb;
        const float* src = st.blocks[t] + static_cast<int64_t>(S * (q0 + lq) + r) * bb + (e - lq * bb);
        copy_async(cached + offset + e, src, vector);
      }
      offset += G * b;
    }
  }
  harp_launch::wait_for_predecessor();
  load_scaled(x + row + first, scale_in == nullptr ? nullptr : scale_in + first, in, G, S);
  if (cache_blocks) copy_async_wait_all();
  __syncthreads();
  int offset = 0;
  for (int t = 0; t < st.count; ++t) {
    const int b = st.radix[t], ls = st.stride[t] / S, bb = b * b, q0 = c * (G / b);
    for (int u = threadIdx.x; u < G; u += blockDim.x) {
      const int U = c * G + u;
      const int q = (U / (b * ls)) * ls + U % ls;
      const int d = (u / ls) % b;
      const int u0 = u - d * ls;
      const float* block = cache_blocks ? cached + offset + (q - q0) * bb
                                        : st.blocks[t] + static_cast<int64_t>(S * q + r) * bb;
      const float* coef = transpose ? block + d : block + d * b;
      const int step = transpose ? b : 1;
      float acc = 0.0f;
#pragma unroll 8
      for (int j = 0; j < b; ++j) acc += coef[j * step] * in[u0 + j * ls];
      out[u] = acc;
    }
    __syncthreads();
    float* const done = out;
    out = in;
    in = done;
    offset += G * b;
  }
  store_scaled(in, 1.0f, scale_out == nullptr ? nullptr : scale_out + first,
               y + row + first, G, S);
}

int threads_for(int work, int cap) {
  const int warps = (work + 31) / 32;
  const int threads = 32 * (warps < 1 ? 1 : warps);
  return threads < cap ? threads : cap;
}

template <typename T>
struct Type {
  using type = T;
};

// launch(Type<XT>{}, Type<YT>{}) for the element types that x_half / y_half name
// (float16 when set, else float32).
template <typename Launch>
int with_io_types(int x_half, int y_half, Launch launch) {
  if (x_half)
    return y_half ? launch(Type<__half>{}, Type<__half>{}) : launch(Type<__half>{}, Type<float>{});
  return y_half ? launch(Type<float>{}, Type<__half>{}) : launch(Type<float>{}, Type<float>{});
}

}  // namespace harp_transforms

extern "C" {

const char* harp_transforms_error_string(int error) {
  if (error == harp_transforms::kErrBadArgument) return "invalid launcher argument";
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

// y (rows, n) = scale_out * (base (x) H_p) (scale * (scale_in * x)), n = k p, p a power of
// two, n <= 32768; base: k x k float32 row-major (null iff k = 1); x fp32 (x_half = 0) or
// fp16, y fp32 (y_half = 0) or fp16; scale_in / scale_out: n floats or null.
int harp_hadamard(const void* x, int x_half, void* y, int y_half, int rows, int n, int k,
                  const float* base, float scale, const float* scale_in,
                  const float* scale_out, void* stream) {
  using namespace harp_transforms;
  if (rows < 0 || rows > 65535 || k < 1 || n < 1 || n > kMaxHadamard || n % k != 0 ||
      (k == 1) != (base == nullptr))
    return kErrBadArgument;
  const int p = n / k;
  if ((p & (p - 1)) != 0) return kErrBadArgument;
  if (rows == 0) return 0;
  int log_p = 0;
  while ((1 << log_p) < p) ++log_p;
  int base_rows = 1;
  if (k > 1) {
    base_rows = kBaseOutputs / p < 1 ? 1 : kBaseOutputs / p;
    base_rows = base_rows < kMaxBaseShared / k ? base_rows : kMaxBaseShared / k;
    base_rows = base_rows < k ? base_rows : k;
  }
  const dim3 grid((k + base_rows - 1) / base_rows, rows);
  const int threads = threads_for(n / 4, kHadamardThreads);
  const size_t shared = sizeof(float) * (k > 1 ? base_rows * (p + k) + n : n);
  return with_io_types(x_half, y_half, [&](auto x_type, auto y_type) {
    using XT = typename decltype(x_type)::type;
    using YT = typename decltype(y_type)::type;
    return harp_launch::launch_dependent(hadamard_kernel<XT, YT>, grid, threads, shared,
                                         static_cast<cudaStream_t>(stream),
                                         static_cast<const XT*>(x), static_cast<YT*>(y), n,
                                         log_p, k, base, base_rows, scale, scale_in, scale_out);
  });
}

// y (rows, n) = the `count` stages (blocks[t], radix[t], stride[t], in application order)
// applied to x (rows, n); their strides must be the consecutive digits S, S b, ... of one
// group of G = prod radix <= 4096 coordinates (any order of application). x and y fp32 or
// fp16 (x_half, y_half).
int harp_rotation_group(const void* x, int x_half, void* y, int y_half, int rows, int n,
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
  int block_floats = 0;
  for (int t = 0; t < count; ++t) block_floats += G * radix[t];
  const int cache_blocks = block_floats <= kMaxCachedBlocks ? 1 : 0;
  const size_t shared = sizeof(float) * (((2 * G + 3) & ~3) + (cache_blocks ? block_floats : 0));
  return with_io_types(x_half, y_half, [&](auto x_type, auto y_type) {
    using XT = typename decltype(x_type)::type;
    using YT = typename decltype(y_type)::type;
    return harp_launch::launch_dependent(rotation_group_kernel<XT, YT>, grid, threads, shared,
                                         static_cast<cudaStream_t>(stream),
                                         static_cast<const XT*>(x), static_cast<YT*>(y), st, n,
                                         S, G, transpose, cache_blocks, scale_in, scale_out);
  });
}

}  // extern "C"
