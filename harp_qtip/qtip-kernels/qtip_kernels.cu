// qtip-kernels: CUDA decode and fused decode-matvec for HARP-QTIP's trellis codes.
//
// Plain CUDA C++ with C-ABI launchers (no torch headers): `nvcc -arch=sm_90 -c
// qtip_kernels.cu` builds it alone. qtip_kernels_binding.cpp wraps the launchers for
// PyTorch; harp_qtip/lib/linear/kernels.py loads the module and is the public API. The
// per-thread code (bit extraction, HYB, products) is in qtip_decode.cuh, shared with the
// host emulation host_check.cpp that the CPU tests compile and compare with torch.
//
// Configuration covered: L = 16 state bits, V = 2, code quantlut_sym (HYB) with
// tlut_bits = 9 (a (512, 2) table, fp32 or fp16, passed as a tensor), K = 2, 3, 4 bits
// per weight (a template parameter), 16 x 16 tiles of T = 256 weights. Anything else
// runs the torch path (the Python wrapper returns None).
//
// Storage (fixed by the torch path, lib/codebook/trellis.py): per linear W' (m x n) an
// int16 tensor (m/16 * n/16, 16 K); tile (i, j) = rows 16 i .. 16 i + 15, columns
// 16 j .. 16 j + 15 at row i * (n/16) + j; inside a tile the 256 weights are row-major
// (position p = 16 r + c). A tile's 16 K words are one tail-biting bitstream of 256 K
// bits, MSB-first within each 16-bit word; the state of step t (t = 0..127) is the
// 16-bit window at bit offset 2 K t read cyclically (the last 16 - 2 K bits wrap to the
// stream's start) and emits weights p = 2 t, 2 t + 1 through HYB:
//   h = (s + 1) s mod 2^32,  index = (h >> 6) & 511,  (w0, w1) = tlut[index],
//   w0 negated when bit 15 of h is set.
// No scale is applied (the caller multiplies by Wscale and the SU / SV of the linear).
//
// Design.
//   * A tile row r is steps 8 r .. 8 r + 7, i.e. stream bits [16 K r, 16 K r + 16 K + 16):
//     words K r .. K r + K - 1 plus the first half of word K r + K (word 0 for r = 15:
//     the tail-biting wrap). So one thread decodes one tile row from K + 1 words read with
//     one or two aligned 32/64-bit loads and one or two 16-bit loads, no shuffles; the 16
//     threads of a half-warp read a tile's 32 K contiguous bytes, a warp two neighbouring
//     tiles. The window of step q is one funnel shift of two registers.
//   * The HYB table lives in shared memory as fp32 (exact for fp32 and fp16 tables),
//     replicated 16 times entry-major (slot = 16 index + replica, 8 bytes each): thread
//     (lane mod 16) reads its own replica, which sits in its own bank pair, so a warp's
//     64-bit table reads never conflict (2 wavefronts, the minimum for 256 bytes). 64 KiB
//     per block (dynamic shared memory above the 48 KiB default), filled once per block
//     from the (512, 2) tensor; up to 3 blocks per SM.
//   * decode: one thread per tile row, 16 exact values out (fp32, or fp16 rounded to
//     nearest even = torch's .half() of the fp32 decode); persistent grid-stride loop.
//   * matvec, y (k, m) fp32 = x (k, n) W'^T for 1 <= k <= 8 (x fp32 or fp16): one block of
//     8 warps per 16-row stripe (persistent grid over the stripes). Half-warp h of warp w
//     walks tile columns j = 2 w + h + 16 u; lane r decodes row r of the tile and keeps
//     its output row's k partial sums in registers across all the stripe's tiles, so the
//     only reduction is one shuffle (half-warps) and a fixed-order sum over the 8 warps in
//     shared memory per stripe. x columns 16 j .. 16 j + 15 are read as float4 (or 4
//     halves) per 4 columns, shared by the 16 lanes of the half-warp (broadcast, L1).
//     A thread first issues the loads of a batch of 8 tile rows (4 when k > 2), then
//     decodes them: batch-1 decode is memory-bound and a whole 4096-wide K = 2 stripe is
//     only 16 KB, so the loads must be in flight together. The first batch's loads are
//     issued before the table fill, so the fill hides under their latency. The next kernel
//     of the stream may launch at the start (early_successor) or once every block has
//     reached the main loop's end on its last stripe (dependent_launch.cuh).
//     Accumulation: one fp32 FMA chain per (lane, x row) in column order, then the fixed
//     reduction: deterministic, relative error ~1e-6 against float64.
//   * Costs per step (2 weights), read off the sm_90 SASS: 6 integer ops (one funnel
//     shift for the window, one IMAD for the hash, a mask and an IMAD for the table
//     address, a shift and a LOP3 for the sign), one conflict-free 64-bit shared load,
//     2 k FMAs. 4096 x 4096 at K = 2 reads 4 MiB of codes (~1.4 us at 3 TB/s); the integer
//     work is ~2 us of the H100's issue rate at k = 1, and k = 8 is bound by fp32 FMA
//     throughput (~4 us). Estimates: not yet measured on a GPU (bench_matvec.py).
//     Registers: <= 80 (3 blocks of 8 warps per SM), 128 for 5..8 rows (2 blocks).
//
// Layout choice: the checkpoint's row-major tiles are decoded as stored (no repack): a
// row-major tile row is 8 consecutive steps, which is what makes the thread-per-tile-row
// mapping need no data exchange. (Upstream QTIP instead permutes tiles into mma fragment
// order for a tensor-core kernel with fp16 x; our matvec keeps fp32 x and fp32 sums.)

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "dependent_launch.cuh"
#include "qtip_decode.cuh"

namespace qtip {

constexpr int kDecodeThreads = 256;
constexpr int kMaxDevices = 64;
constexpr int kErrBadArgument = -1;
constexpr size_t kTableBytes = sizeof(Point) * kTableSlots;  // 64 KiB

// ---------------------------------------------------------------- shared-memory table

// Fill the 16 replicas of every table entry (block-wide; the caller syncs). At store q a
// lane writes replica (q + lane) mod 16, so the 16 lanes of a half-warp hit 16 bank pairs.
__device__ __forceinline__ void fill_table(Point* table, const void* tlut, int tlut_half) {
  const int lane = threadIdx.x & 31;
  for (int e = threadIdx.x; e < kTlutSize; e += blockDim.x) {
    Point p;
    if (tlut_half) {
      const __half2 v = __ldg(reinterpret_cast<const __half2*>(tlut) + e);
      const float2 f = __half22float2(v);
      p.x = f.x;
      p.y = f.y;
    } else {
      const float2 f = __ldg(reinterpret_cast<const float2*>(tlut) + e);
      p.x = f.x;
      p.y = f.y;
    }
#pragma unroll
    for (int q = 0; q < kReplicas; ++q) table[table_slot(e, (q + lane) & (kReplicas - 1))] = p;
  }
}

// ---------------------------------------------------------------- kernels

template <typename OutT>
__device__ __forceinline__ void store_row(OutT* dst, const float (&v)[kTileDim]);

template <>
__device__ __forceinline__ void store_row<float>(float* dst, const float (&v)[kTileDim]) {
#pragma unroll
  for (int q = 0; q < kTileDim / 4; ++q)
    reinterpret_cast<float4*>(dst)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
}

template <>
__device__ __forceinline__ void store_row<__half>(__half* dst, const float (&v)[kTileDim]) {
  uint32_t words[kTileDim / 2];
#pragma unroll
  for (int q = 0; q < kTileDim / 2; ++q) {
    const __half2 h = __floats2half2_rn(v[2 * q], v[2 * q + 1]);
    memcpy(&words[q], &h, sizeof(uint32_t));
  }
  reinterpret_cast<uint4*>(dst)[0] = make_uint4(words[0], words[1], words[2], words[3]);
  reinterpret_cast<uint4*>(dst)[1] = make_uint4(words[4], words[5], words[6], words[7]);
}

// out (m, n) = W', one thread per tile row.
template <int K, typename OutT>
__global__ void __launch_bounds__(kDecodeThreads)
decode_kernel(const uint16_t* __restrict__ packed, const void* __restrict__ tlut, int tlut_half,
              int m, int n, OutT* __restrict__ out) {
  extern __shared__ Point table[];
  constexpr int words = Config<K>::kWordsPerTile;
  fill_table(table, tlut, tlut_half);
  __syncthreads();
  const LaneTable my_table = lane_table(table, threadIdx.x & (kReplicas - 1));
  const int64_t tiles_n = n / kTileDim;
  const int64_t total = static_cast<int64_t>(m / kTileDim) * tiles_n * kTileDim;  // tile rows
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;  // a multiple of 16
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total;
       g += stride) {
    const int64_t tile = g / kTileDim;
    const int r = static_cast<int>(g % kTileDim);  // = threadIdx.x mod 16
    const int64_t i = tile / tiles_n;
    const int64_t j = tile - i * tiles_n;
    uint32_t w[Config<K>::kRowRegs];
    load_row_bits<K>(packed + tile * words, r, w);
    float v[kTileDim];
    decode_row<K>(w, my_table, v);
    store_row<OutT>(out + (i * kTileDim + r) * n + j * kTileDim, v);
  }
}

// out (k, m) fp32 = x (k, n) W'^T, 1 <= k <= KR; see the design notes above.
template <int K, int KR, typename XT>
__global__ void __launch_bounds__(kMatvecThreads, MatvecBatch<KR>::kMinBlocks)
matvec_kernel(const XT* __restrict__ x, const uint16_t* __restrict__ packed,
              const void* __restrict__ tlut, int tlut_half, int k, int m, int n,
              int early_successor, float* __restrict__ out) {
  extern __shared__ Point table[];
  __shared__ float partial[kMatvecWarps][KR][kTileDim];
  constexpr int words = Config<K>::kWordsPerTile;
  constexpr int D = MatvecBatch<KR>::kRows;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int r = lane & (kTileDim - 1);
  const int j0 = 2 * warp + (lane >> 4);
  const int tiles_n = n / kTileDim;
  const int stripes = m / kTileDim;
  const int64_t stripe_words = static_cast<int64_t>(tiles_n) * words;

  // The first batch's loads and the table fill go out before x exists (the input transform
  // may still be running: dependent_launch.cuh).
  if (early_successor) harp_launch::allow_dependents();
  RowRaw raw[D] = {};
  int stripe = blockIdx.x;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    const int j = j0 + d * kTileColumnsPerPass;
    if (stripe < stripes && j < tiles_n)
      raw[d] = load_row_raw<K>(packed + stripe * stripe_words + static_cast<int64_t>(j) * words, r);
  }
  fill_table(table, tlut, tlut_half);
  harp_launch::wait_for_predecessor();
  __syncthreads();
  const LaneTable my_table = lane_table(table, r);

  bool loaded = true;
  for (; stripe < stripes; stripe += gridDim.x) {
    const uint16_t* stripe_codes = packed + stripe * stripe_words;
    float acc[KR];
#pragma unroll
    for (int t = 0; t < KR; ++t) acc[t] = 0.0f;
    for (int jb = j0; jb < tiles_n; jb += D * kTileColumnsPerPass) {
      if (!loaded) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
          const int j = jb + d * kTileColumnsPerPass;
          if (j < tiles_n) raw[d] = load_row_raw<K>(stripe_codes + static_cast<int64_t>(j) * words, r);
        }
      }
      loaded = false;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        const int j = jb + d * kTileColumnsPerPass;
        if (j < tiles_n) {
          uint32_t w[Config<K>::kRowRegs];
          row_bits<K>(raw[d], r, w);
          accumulate_row<K, KR, XT>(w, x + static_cast<int64_t>(j) * kTileDim, n, k, my_table, acc);
        }
      }
    }
    loaded = false;
    if (!early_successor && stripe + gridDim.x >= stripes) harp_launch::allow_dependents();

#pragma unroll
    for (int t = 0; t < KR; ++t) acc[t] += __shfl_xor_sync(0xFFFFFFFFu, acc[t], 16);
    if (lane < kTileDim) {
#pragma unroll
      for (int t = 0; t < KR; ++t) partial[warp][t][r] = acc[t];
    }
    __syncthreads();
    if (threadIdx.x < KR * kTileDim) {
      const int t = threadIdx.x / kTileDim;
      const int rr = threadIdx.x % kTileDim;
      if (t < k) {
        float sum = partial[0][t][rr];
#pragma unroll
        for (int v = 1; v < kMatvecWarps; ++v) sum += partial[v][t][rr];
        out[static_cast<int64_t>(t) * m + stripe * kTileDim + rr] = sum;
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- launchers

int current_device_sms(int* sms) {
  static int cached[kMaxDevices] = {0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (device < 0 || device >= kMaxDevices) return kErrBadArgument;
  if (cached[device] == 0) {
    int count = 0;
    err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return static_cast<int>(err);
    cached[device] = count;
  }
  *sms = cached[device];
  return 0;
}

// Blocks of `Kernel` that fit on one SM with the 64 KiB table (plus its static shared
// memory), after raising its dynamic shared-memory limit; cached per kernel and device.
template <auto Kernel>
int resident_blocks(int threads, int* blocks) {
  static int cached[kMaxDevices] = {0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (device < 0 || device >= kMaxDevices) return kErrBadArgument;
  if (cached[device] == 0) {
    err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(kTableBytes));
    if (err != cudaSuccess) return static_cast<int>(err);
    int count = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, Kernel, threads, kTableBytes);
    if (err != cudaSuccess) return static_cast<int>(err);
    cached[device] = count > 0 ? count : 1;
  }
  *blocks = cached[device];
  return 0;
}

// A persistent grid: `work_blocks` blocks of work, at most as many blocks as fit at once.
template <auto Kernel>
int grid_size(int threads, int64_t work_blocks, int* grid) {
  int sms = 0, per_sm = 0;
  int err = current_device_sms(&sms);
  if (err) return err;
  err = resident_blocks<Kernel>(threads, &per_sm);
  if (err) return err;
  const int64_t most = static_cast<int64_t>(sms) * per_sm;
  *grid = static_cast<int>(work_blocks < most ? work_blocks : most);
  return 0;
}

template <int K, typename OutT>
int launch_decode(const void* packed, const void* tlut, int tlut_half, int m, int n, void* out,
                  cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(m / kTileDim) * (n / kTileDim) * kTileDim;
  int grid = 0;
  const int err = grid_size<decode_kernel<K, OutT>>(
      kDecodeThreads, (rows + kDecodeThreads - 1) / kDecodeThreads, &grid);
  if (err) return err;
  decode_kernel<K, OutT><<<grid, kDecodeThreads, kTableBytes, stream>>>(
      static_cast<const uint16_t*>(packed), tlut, tlut_half, m, n, static_cast<OutT*>(out));
  return static_cast<int>(cudaGetLastError());
}

template <int K, int KR, typename XT>
int launch_matvec(const void* x, const void* packed, const void* tlut, int tlut_half, int k,
                  int m, int n, int early_successor, float* out, cudaStream_t stream) {
  int grid = 0;
  const int err = grid_size<matvec_kernel<K, KR, XT>>(kMatvecThreads, m / kTileDim, &grid);
  if (err) return err;
  return harp_launch::launch_dependent(matvec_kernel<K, KR, XT>, dim3(grid), kMatvecThreads,
                                       kTableBytes, stream, static_cast<const XT*>(x),
                                       static_cast<const uint16_t*>(packed), tlut, tlut_half, k,
                                       m, n, early_successor, out);
}

template <int K, typename XT>
int dispatch_matvec_rows(const void* x, const void* packed, const void* tlut, int tlut_half,
                         int k, int m, int n, int early, float* out, cudaStream_t s) {
  switch (rows_bucket(k)) {
    case 1: return launch_matvec<K, 1, XT>(x, packed, tlut, tlut_half, k, m, n, early, out, s);
    case 2: return launch_matvec<K, 2, XT>(x, packed, tlut, tlut_half, k, m, n, early, out, s);
    case 4: return launch_matvec<K, 4, XT>(x, packed, tlut, tlut_half, k, m, n, early, out, s);
    default: return launch_matvec<K, 8, XT>(x, packed, tlut, tlut_half, k, m, n, early, out, s);
  }
}

template <typename XT>
int dispatch_matvec(int K, const void* x, const void* packed, const void* tlut, int tlut_half,
                    int k, int m, int n, int early, float* out, cudaStream_t s) {
  switch (K) {
    case 2: return dispatch_matvec_rows<2, XT>(x, packed, tlut, tlut_half, k, m, n, early, out, s);
    case 3: return dispatch_matvec_rows<3, XT>(x, packed, tlut, tlut_half, k, m, n, early, out, s);
    case 4: return dispatch_matvec_rows<4, XT>(x, packed, tlut, tlut_half, k, m, n, early, out, s);
    default: return kErrBadArgument;
  }
}

template <typename OutT>
int dispatch_decode(int K, const void* packed, const void* tlut, int tlut_half, int m, int n,
                    void* out, cudaStream_t s) {
  switch (K) {
    case 2: return launch_decode<2, OutT>(packed, tlut, tlut_half, m, n, out, s);
    case 3: return launch_decode<3, OutT>(packed, tlut, tlut_half, m, n, out, s);
    case 4: return launch_decode<4, OutT>(packed, tlut, tlut_half, m, n, out, s);
    default: return kErrBadArgument;
  }
}

bool bad_shape(int m, int n) { return m < 0 || n < 0 || m % kTileDim || n % kTileDim; }

}  // namespace qtip

// ---------------------------------------------------------------- C ABI

extern "C" {

// 0 on success, a cudaError_t value (> 0), or -1 for arguments the launcher refuses.
const char* qtip_kernels_error_string(int error) {
  if (error == qtip::kErrBadArgument) return "qtip_kernels: invalid launcher argument";
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

// W' (m, n) of the packed trellis (m/16 * n/16, 16 K) int16 into out: fp16 when out_half,
// else fp32. tlut: (512, 2) fp16 (tlut_half) or fp32, 8-byte aligned. m, n multiples of 16;
// packed 8-byte aligned, out 16-byte aligned.
int qtip_kernels_decode(int K, const void* packed, const void* tlut, int tlut_half, int m, int n,
                        void* out, int out_half, void* stream) {
  using namespace qtip;
  if (K < 2 || K > 4 || bad_shape(m, n)) return kErrBadArgument;
  if (m == 0 || n == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return out_half ? dispatch_decode<__half>(K, packed, tlut, tlut_half, m, n, out, s)
                  : dispatch_decode<float>(K, packed, tlut, tlut_half, m, n, out, s);
}

// out (k, m) fp32 = x (k, n) W'^T, 1 <= k <= 8; x fp32 (x_half = 0) or fp16, row-major,
// contiguous, 16-byte aligned; packed and tlut as for qtip_kernels_decode. early_successor:
// where the kernel lets the next kernel of the stream launch (1: at its start, 0: after its
// main loop); the result is the same.
int qtip_kernels_matvec(int K, const void* x, int x_half, const void* packed, const void* tlut,
                        int tlut_half, int k, int m, int n, int early_successor, float* out,
                        void* stream) {
  using namespace qtip;
  if (K < 2 || K > 4 || k < 1 || k > 8 || bad_shape(m, n)) return kErrBadArgument;
  if (m == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (n == 0) return static_cast<int>(cudaMemsetAsync(out, 0, sizeof(float) * k * m, s));
  return x_half ? dispatch_matvec<__half>(K, x, packed, tlut, tlut_half, k, m, n, early_successor, out, s)
                : dispatch_matvec<float>(K, x, packed, tlut, tlut_half, k, m, n, early_successor, out, s);
}

}  // extern "C"
