// quiptools: CUDA kernels for the E8P12 codebook and its residual variants.
//
// Plain CUDA C++ with C-ABI launchers (no torch headers), so this file compiles on
// its own:  nvcc -arch=sm_90 -c quiptools.cu.  quiptools_binding.cpp wraps the
// launchers for PyTorch; lib/linear/kernels.py loads the module and is the public API.
//
// Code layout (ours, lib/codebook/e8p12.py): a 16-bit E8P12 code is
// (pattern << 8) | sign bits. `abs_table[pattern]` (packed_abs_table(), 256 int32)
// holds the pattern's base point b as eight 4-bit nibbles, nibble j = 2 b[c_j] + 8
// with c = COORD_OF_SIGN_BIT = (0, 2, 4, 6, 1, 3, 5, 7), so nibble j pairs with sign
// bit j. Decoding: odd = parity of the sign bits; flip nibble j's value when bit j is
// set, and flip nibble 0 once more when odd; add -1/4 when odd, +1/4 otherwise.
//
// Every nibble is odd (2 b + 8 with b a half-odd integer), so negating its value
// 2 b = nib - 8 is nib -> 16 - nib = nib ^ 0xE: all sign flips of a code are one XOR
// of the packed word. A nibble then becomes the float 2^23 + nib through one byte
// permute into 0x4B000000, and y = 2 (value - shift) = nib - 8 in one subtraction.
// All of this is exact: decoded E8P12 values are multiples of 1/4 in [-2.75, 2.75].
//
// Modes (how an int code holds the stages; the residual layouts of e8p12_rvq.py):
//   0 E8P12       int16 codes: the 16-bit code.
//   1 E8P12RVQ4B  int32 codes: stage 1 = bits 16..31, stage 2 = bits 0..15 (E8P12 again);
//                 point = q1 + q2 / resid_scale.
//   2 E8P12RVQ3B  int32 codes: stage 1 = bits 8..23, stage 2 = bits 0..7, an index into
//                 the 256 x 8 float32 table q2 / resid_scale (scaled_stage2_on()); bits
//                 24..31 are ignored (codes_from_storage masks them off too).
//
// Kernels:
//   decode: one thread per code, 8 values out (fp16 for mode 0 on request, else fp32).
//     Bit-exact with the torch decode: mode 0 values are exact in fp16/fp32; mode 1 adds
//     (float)((double) q2 / resid_scale), the same rounding as the float64 table of
//     ResidualE8P12.scaled_stage2_on; mode 2 adds the same float32 table entries.
//   matvec: out (k, m) fp32 = x (k, n) . W^T for k <= 8, x fp32 or fp16. One warp per
//     ROWS output rows; lane l reads code columns l, l + 32, ... of those rows (each warp
//     load instruction covers 32 consecutive codes of a row, coalesced), decodes them with
//     the 1 KB abs table in shared memory, and accumulates in fp32; a butterfly shuffle
//     sums the lanes. The +-1/4 shift is folded out of the inner product:
//     sum_i x_i (y_i / 2 + s) = (sum_i x_i y_i + 2 s sum_i x_i) / 2.
//     Numerics: fp32 products of exact weights and fp32 sums in another order than the
//     torch path; mode 1 scales the stage-2 sum by 1 / resid_scale instead of rounding
//     each weight. Relative difference to the torch path ~1e-6 (fp32 rounding).
//   matvec_mma (E8P12, k <= 2, n / 8 a multiple of 8): the same product on the tensor
//     cores, mma.m16n8k16 bf16 x bf16 -> fp32. A CTA owns 1 or 2 tiles of 16 output rows
//     (matvec_mma_tiles); its warps split the columns. It is a programmatic dependent
//     launch (dependent_launch.cuh): the pattern table and the first codes load before it
//     waits for x; its successor may launch at its start or only after its main loop
//     (early_successor, chosen by the caller). Weights: every E8P12 value is exact in bf16
//     (multiples of 1/4, at most 2.75). One XOR with a flip-table entry (indexed by the
//     sign byte: the sign flips, and the parity in bit 0 of every nibble) turns the pattern
//     word into nibbles nib' = signed nibble - odd; nibble pairs become bf16 32 + nib' / 2
//     through one byte permute into 0x4200, and value = that - 35.75 in one bf16x2
//     subtraction (exact; the shift +-1/4 is 1/4 - odd / 2). Both tables sit in shared
//     memory in copies (kPatternCopies, kFlipCopies), so that a warp's 32 random lookups
//     collide in fewer banks. Inputs: each x row is split once per CTA, 8 values per
//     thread and step, into three bf16 terms x = hi + mid + lo (hi = bf16(x), mid =
//     bf16(x - hi), lo = bf16(x - hi - mid): 24 significant bits, fp32's), the B columns
//     3j, 3j + 1, 3j + 2 of row j, so one mma multiplies every term and the three fp32
//     column sums add up to the fp32 product.
//     The k slots of the mma are a permutation of the columns (thread t's 4 slots take
//     values of its own code), the same for A and B.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "dependent_launch.cuh"

#define QT_HD __host__ __device__ __forceinline__

namespace quiptools {

constexpr int kModeE8P12 = 0;
constexpr int kModeRVQ4B = 1;
constexpr int kModeRVQ3B = 2;
constexpr int kCodesz = 8;
constexpr int kPatterns = 256;
constexpr int kTable2Floats = 256 * kCodesz;

constexpr int kWarpsPerBlock = 4;    // matvec block: 4 warps
constexpr int kRowsPerWarp = 2;      // output rows per warp (x values are reused across them)
constexpr int kUnroll = 4;           // code columns per lane loaded before decoding them
constexpr int kMmaWarps = 8;         // matvec_mma block: 8 warps share 16 rows
constexpr int kMmaRows = 16;
constexpr int kMmaTwoTileRows = 4096;  // matvec_mma: 2 row tiles per CTA from this many rows
constexpr int kMmaTwoTileMaxCols = 8192;  // ... up to this many columns
constexpr int kMmaMaxK = 2;          // input rows of matvec_mma (3 bf16 terms each, n = 8)
constexpr int kMmaMaxShared = 200 * 1024;
constexpr int kMmaSplitUnroll = 2;   // code columns of x (8 values each) in flight per thread
// matvec_mma CTAs an SM must hold by registers (64 a thread, where nvcc would take 75 for
// two tiles), leaving room for the kernels launched beside it (dependent launches).
constexpr int kMmaMinBlocks = 4;
constexpr int kDecodeThreads = 256;
constexpr int kDecodeMaxBlocks = 2048;

constexpr int kErrBadArgument = -1;

// ---------------------------------------------------------------- bit helpers (host and device)

QT_HD uint32_t popcount32(uint32_t v) {
#ifdef __CUDA_ARCH__
  return __popc(v);
#else
  return static_cast<uint32_t>(__builtin_popcount(v));
#endif
}

// __byte_perm: result byte i = byte selector[i] (low 3 bits of nibble i) of the 8 bytes {b:a}.
QT_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t selector) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, selector);
#else
  const uint64_t bytes = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t result = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t pick = (selector >> (4 * i)) & 7u;
    result |= static_cast<uint32_t>((bytes >> (8 * pick)) & 0xFFu) << (8 * i);
  }
  return result;
#endif
}

QT_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// 2^23 + nib for the nibble in byte `byte` of `word` (each byte holds one nibble).
template <int byte>
QT_HD float nibble_as_float(uint32_t word) {
  return bits_to_float(byte_perm(word, 0x4B000000u, 0x7540u + byte));
}

// The XOR mask that applies the sign bits `bits` (low byte of a code) to its packed nibbles:
// 0xE in every nibble whose value flips; odd = parity of the bits.
QT_HD uint32_t e8p12_flip_mask(uint32_t bits, uint32_t& odd) {
  odd = popcount32(bits) & 1u;
  const uint32_t flips = bits ^ odd;  // sign bit 0 (coordinate 0) flips again when odd
  // Spread flip bit j to bit 4j, then 0xE in every flipped nibble (negates its value).
  uint32_t spread = (flips & 0x0Fu) | ((flips & 0xF0u) << 12);
  spread = (spread | (spread << 6)) & 0x03030303u;
  spread = (spread | (spread << 3)) & 0x11111111u;
  return spread * 0xEu;
}

// The packed nibbles of a 16-bit E8P12 code with its signs applied (nibble j = 2 v + 8 for
// the value v of coordinate c_j before the shift); odd = parity of the sign bits (the
// shift is -1/4 when odd, else +1/4).
QT_HD uint32_t e8p12_signed_nibbles(uint32_t code, const uint32_t* abs_table, uint32_t& odd) {
  return abs_table[(code >> 8) & 0xFFu] ^ e8p12_flip_mask(code & 0xFFu, odd);
}

// matvec_mma's entry `bits` of the flip table: the flip mask with the parity in bit 0 of
// every nibble as well. XORed into the (odd) pattern nibbles it gives nib' = signed nibble
// - odd, so 2 value = nib' - 8 + 1/2 for both parities: the shift needs no select.
QT_HD uint32_t e8p12_flip_entry(uint32_t bits) {
  uint32_t odd;
  const uint32_t mask = e8p12_flip_mask(bits, odd);
  return mask | (odd * 0x11111111u);
}

// Decode one 16-bit E8P12 code: y[i] = 2 (value_i - shift) (odd integers in [-5, 5]) in
// coordinate order, shift2 = 2 shift = +-1/2, so value_i = (y[i] + shift2) / 2.
QT_HD void e8p12_decode_twice(uint32_t code, const uint32_t* abs_table, float (&y)[kCodesz],
                              float& shift2) {
  uint32_t odd;
  const uint32_t word = e8p12_signed_nibbles(code, abs_table, odd);
  const uint32_t even_nibbles = word & 0x0F0F0F0Fu;         // nibbles 0,2,4,6: coords 0,4,1,5
  const uint32_t odd_nibbles = (word >> 4) & 0x0F0F0F0Fu;   // nibbles 1,3,5,7: coords 2,6,3,7
  const float offset = 8388616.0f;                          // 2^23 + 8
  y[0] = nibble_as_float<0>(even_nibbles) - offset;
  y[4] = nibble_as_float<1>(even_nibbles) - offset;
  y[1] = nibble_as_float<2>(even_nibbles) - offset;
  y[5] = nibble_as_float<3>(even_nibbles) - offset;
  y[2] = nibble_as_float<0>(odd_nibbles) - offset;
  y[6] = nibble_as_float<1>(odd_nibbles) - offset;
  y[3] = nibble_as_float<2>(odd_nibbles) - offset;
  y[7] = nibble_as_float<3>(odd_nibbles) - offset;
  shift2 = odd ? -0.5f : 0.5f;
}

// The 8 exact values of a 16-bit E8P12 code.
QT_HD void e8p12_decode(uint32_t code, const uint32_t* abs_table, float (&v)[kCodesz]) {
  float y[kCodesz];
  float shift2;
  e8p12_decode_twice(code, abs_table, y, shift2);
#pragma unroll
  for (int i = 0; i < kCodesz; ++i) v[i] = 0.5f * (y[i] + shift2);  // exact
}

template <int MODE>
QT_HD uint32_t stage1_code(uint32_t c) {
  return MODE == kModeE8P12 ? (c & 0xFFFFu) : MODE == kModeRVQ4B ? (c >> 16) : ((c >> 8) & 0xFFFFu);
}

// The decoded point of one stored code (see the modes above), float32, coordinate order.
template <int MODE>
QT_HD void decode_point(uint32_t c, const uint32_t* abs_table, const float* table2,
                        double resid_scale, float (&v)[kCodesz]) {
  e8p12_decode(stage1_code<MODE>(c), abs_table, v);
  if constexpr (MODE == kModeRVQ4B) {
    float q2[kCodesz];
    e8p12_decode(c & 0xFFFFu, abs_table, q2);
#pragma unroll
    for (int i = 0; i < kCodesz; ++i)
      v[i] += static_cast<float>(static_cast<double>(q2[i]) / resid_scale);
  } else if constexpr (MODE == kModeRVQ3B) {
    const float* row = table2 + kCodesz * (c & 0xFFu);
#pragma unroll
    for (int i = 0; i < kCodesz; ++i) v[i] += row[i];
  }
}

// ---------------------------------------------------------------- loads

QT_HD void load_x8(const float* p, float (&v)[kCodesz]) {
#ifdef __CUDA_ARCH__
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
#else
  memcpy(v, p, sizeof(v));
#endif
}

QT_HD void load_x8(const __half* p, float (&v)[kCodesz]) {
#ifdef __CUDA_ARCH__
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &words[i], sizeof(h));
    const float2 f = __half22float2(h);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
#else
  for (int i = 0; i < kCodesz; ++i) v[i] = __half2float(p[i]);
#endif
}

template <typename CodeT>
__device__ __forceinline__ uint32_t load_code(const CodeT* p) {
  return static_cast<uint32_t>(__ldg(p));
}

template <>
__device__ __forceinline__ uint32_t load_code<uint16_t>(const uint16_t* p) {
  return static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

// ---------------------------------------------------------------- matvec core (host and device)

// Accumulators of one lane for ROWS output rows and up to K input rows.
//   acc1[r][j] = sum over its columns of  x_j . y1 + shift2 * sum(x_j)  (twice the stage-1 dot)
//   acc2[r][j] = mode 1: the same for stage 2; mode 2: x_j . table2 row (already / s).
template <int K, int ROWS, int MODE>
struct Accumulators {
  float acc1[ROWS][K];
  float acc2[ROWS][MODE == kModeE8P12 ? 1 : K];

  QT_HD void zero() {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
      for (int j = 0; j < K; ++j) acc1[r][j] = 0.0f;
#pragma unroll
      for (int j = 0; j < (MODE == kModeE8P12 ? 1 : K); ++j) acc2[r][j] = 0.0f;
    }
  }

  // Output value of row r, input row j, once the lanes are summed.
  QT_HD float result(int r, int j, float inv_resid_scale) const {
    const float stage1 = 0.5f * acc1[r][j];
    if constexpr (MODE == kModeRVQ4B) return stage1 + (0.5f * acc2[r][j]) * inv_resid_scale;
    else if constexpr (MODE == kModeRVQ3B) return stage1 + acc2[r][j];
    else return stage1;
  }
};

// Add code column `col` (x columns 8 col .. 8 col + 7) of ROWS rows, whose stored codes are
// codes[r], to the accumulators; k <= K input rows of x, row stride n.
template <int K, int ROWS, int MODE, typename XT>
QT_HD void accumulate_column(const XT* x, int64_t n, int k, int64_t col,
                             const uint32_t (&codes)[ROWS], const uint32_t* abs_table,
                             const float* table2, Accumulators<K, ROWS, MODE>& acc) {
  float y1[ROWS][kCodesz];
  float shift1[ROWS];
  float y2[ROWS][kCodesz];
  float shift2[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    e8p12_decode_twice(stage1_code<MODE>(codes[r]), abs_table, y1[r], shift1[r]);
    if constexpr (MODE == kModeRVQ4B) {
      e8p12_decode_twice(codes[r] & 0xFFFFu, abs_table, y2[r], shift2[r]);
    } else if constexpr (MODE == kModeRVQ3B) {
      const float* row = table2 + kCodesz * (codes[r] & 0xFFu);
#pragma unroll
      for (int i = 0; i < kCodesz; ++i) y2[r][i] = row[i];
      shift2[r] = 0.0f;
    }
  }
#pragma unroll
  for (int j = 0; j < K; ++j) {
    if (j < k) {
      float xv[kCodesz];
      load_x8(x + j * n + kCodesz * col, xv);
      const float xsum = ((xv[0] + xv[1]) + (xv[2] + xv[3])) + ((xv[4] + xv[5]) + (xv[6] + xv[7]));
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float a = acc.acc1[r][j];
#pragma unroll
        for (int i = 0; i < kCodesz; ++i) a = fmaf(xv[i], y1[r][i], a);
        acc.acc1[r][j] = fmaf(shift1[r], xsum, a);
        if constexpr (MODE != kModeE8P12) {
          float b = acc.acc2[r][j];
#pragma unroll
          for (int i = 0; i < kCodesz; ++i) b = fmaf(xv[i], y2[r][i], b);
          if constexpr (MODE == kModeRVQ4B) b = fmaf(shift2[r], xsum, b);
          acc.acc2[r][j] = b;
        }
      }
    }
  }
}

// ---------------------------------------------------------------- kernels

template <int MODE>
struct CodeType { using type = uint32_t; };
template <>
struct CodeType<kModeE8P12> { using type = uint16_t; };

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

template <int MODE>
__device__ __forceinline__ void load_tables(const uint32_t* abs_g, const float* table2_g,
                                            uint32_t* abs_s, float* table2_s) {
  for (int i = threadIdx.x; i < kPatterns; i += blockDim.x) abs_s[i] = abs_g[i];
  if constexpr (MODE == kModeRVQ3B)
    for (int i = threadIdx.x; i < kTable2Floats; i += blockDim.x) table2_s[i] = table2_g[i];
  __syncthreads();
}

template <int MODE, typename OutT>
__global__ void __launch_bounds__(kDecodeThreads)
decode_kernel(const typename CodeType<MODE>::type* __restrict__ codes,
              const uint32_t* __restrict__ abs_g, const float* __restrict__ table2_g,
              double resid_scale, int64_t total, OutT* __restrict__ out) {
  __shared__ uint32_t abs_s[kPatterns];
  __shared__ __align__(16) float table2_s[MODE == kModeRVQ3B ? kTable2Floats : 4];
  load_tables<MODE>(abs_g, table2_g, abs_s, table2_s);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    float v[kCodesz];
    decode_point<MODE>(load_code(codes + i), abs_s, table2_s, resid_scale, v);
    OutT* dst = out + kCodesz * i;
    if constexpr (sizeof(OutT) == 2) {
      uint4 packed;
      __half2 h[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) h[q] = __floats2half2_rn(v[2 * q], v[2 * q + 1]);
      memcpy(&packed, h, sizeof(packed));
      *reinterpret_cast<uint4*>(dst) = packed;
    } else {
      reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
  }
}

// out (k, m) = x (k, n) W^T, n = 8 groups; block = kWarpsPerBlock warps, kRowsPerWarp rows each.
template <int K, int MODE, typename XT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 1)
matvec_kernel(const XT* __restrict__ x, const typename CodeType<MODE>::type* __restrict__ codes,
              const uint32_t* __restrict__ abs_g, const float* __restrict__ table2_g,
              float inv_resid_scale, int k, int m, int groups, float* __restrict__ out) {
  using CodeT = typename CodeType<MODE>::type;
  constexpr int ROWS = kRowsPerWarp;
  __shared__ uint32_t abs_s[kPatterns];
  __shared__ __align__(16) float table2_s[MODE == kModeRVQ3B ? kTable2Floats : 4];
  load_tables<MODE>(abs_g, table2_g, abs_s, table2_s);

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kWarpsPerBlock + warp) * ROWS;
  if (row0 >= m) return;  // whole warp leaves together
  const int64_t n = static_cast<int64_t>(groups) * kCodesz;
  const CodeT* row_codes[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = min(row0 + r, m - 1);  // rows past m repeat the last row; never written
    row_codes[r] = codes + static_cast<int64_t>(row) * groups;
  }

  Accumulators<K, ROWS, MODE> acc;
  acc.zero();
  for (int base = 0; base < groups; base += 32 * kUnroll) {
    uint32_t c[kUnroll][ROWS];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int col = base + 32 * u + lane;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) c[u][r] = col < groups ? load_code(row_codes[r] + col) : 0u;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int col = base + 32 * u + lane;
      if (col < groups) accumulate_column<K, ROWS, MODE>(x, n, k, col, c[u], abs_s, table2_s, acc);
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      acc.acc1[r][j] = warp_sum(acc.acc1[r][j]);
      if constexpr (MODE != kModeE8P12) acc.acc2[r][j] = warp_sum(acc.acc2[r][j]);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = row0 + r;
#pragma unroll
      for (int j = 0; j < K; ++j)
        if (row < m && j < k) out[static_cast<int64_t>(j) * m + row] = acc.result(r, j, inv_resid_scale);
    }
  }
}

// ---------------------------------------------------------------- tensor-core matvec (E8P12)

// matvec_mma's decode tables in shared memory, in copies so that the random lookups of a
// warp do not collide in the 32 banks: the pattern table in kPatternCopies copies (entry
// e's copy c at word e * kPatternCopies + c; lane l reads copy l % kPatternCopies) and the
// flip table (e8p12_flip_entry of every sign byte) in kFlipCopies copies (lane l reads copy
// l % kFlipCopies). The copies cost shared memory that the kernels launched beside the
// matvec want too. Decode step, Llama-2-7B shape, H200, one run (before the x terms were
// spread over the banks), ms had / harp: one copy each 5.73 / 6.06, 32 / 8 copies 5.50 /
// 6.06, 16 / 4 copies 5.50 / 5.99, 8 / 8 copies 5.55 / 6.05.
constexpr int kPatternCopies = 16;
constexpr int kFlipCopies = 4;
constexpr int kDecodeTableBytes = sizeof(uint32_t) * kPatterns * (kPatternCopies + kFlipCopies);
static_assert(kPatternCopies % 4 == 0 && kPatternCopies <= 32 && kFlipCopies % 4 == 0 &&
                  kFlipCopies <= 32, "fill_decode_tables stores 16-byte quarters; a lane reads one copy");

__device__ __forceinline__ void fill_decode_tables(const uint32_t* abs_g, uint32_t* patterns,
                                                   uint32_t* flips) {
  for (int e = threadIdx.x; e < kPatterns; e += blockDim.x) {
    const uint32_t pattern = abs_g[e], flip = e8p12_flip_entry(e);
    // Lanes store 16-byte quarters in a rotating order, so a warp's stores spread over the banks.
#pragma unroll
    for (int c = 0; c < kPatternCopies / 4; ++c) {
      const int quarter = (c + e) % (kPatternCopies / 4);
      *reinterpret_cast<uint4*>(patterns + e * kPatternCopies + 4 * quarter) =
          make_uint4(pattern, pattern, pattern, pattern);
    }
#pragma unroll
    for (int c = 0; c < kFlipCopies / 4; ++c)
      *reinterpret_cast<uint4*>(flips + e * kFlipCopies + 4 * c) = make_uint4(flip, flip, flip, flip);
  }
}

__device__ __forceinline__ uint32_t load_shared(uint32_t address) {
  uint32_t value;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(value) : "r"(address));
  return value;
}

// Shared addresses of this lane's copies of entry 0 of the decode tables.
struct LaneTables {
  uint32_t patterns, flips;
};

__device__ __forceinline__ LaneTables lane_tables(const uint32_t* patterns, const uint32_t* flips,
                                                  int lane) {
  return {static_cast<uint32_t>(__cvta_generic_to_shared(patterns + lane % kPatternCopies)),
          static_cast<uint32_t>(__cvta_generic_to_shared(flips + lane % kFlipCopies))};
}

// The 8 values of the 16-bit E8P12 code in bytes `byte`, `byte` + 1 of `codes` (sign byte,
// pattern) as bf16 pairs (c0, c1), (c2, c3), (c4, c5), (c6, c7) (low half first), exact; see
// the matvec_mma notes at the top.
__device__ __forceinline__ void e8p12_bf16_pairs(uint32_t codes, int byte, LaneTables tables,
                                                 uint32_t (&w)[4]) {
  const uint32_t pattern = __byte_perm(codes, 0u, 0x4441u + byte);
  const uint32_t sign = __byte_perm(codes, 0u, 0x4440u + byte);
  const uint32_t word =
      load_shared(tables.patterns + pattern * (sizeof(uint32_t) * kPatternCopies)) ^
      load_shared(tables.flips + sign * (sizeof(uint32_t) * kFlipCopies));
  const uint32_t even2 = (word << 1) & 0x1E1E1E1Eu;  // 2 nib' of coordinates 0, 4, 1, 5
  const uint32_t odd2 = (word >> 3) & 0x1E1E1E1Eu;   // 2 nib' of coordinates 2, 6, 3, 7
  w[0] = __byte_perm(even2, 0x42u, 0x4240u);
  w[1] = __byte_perm(odd2, 0x42u, 0x4240u);
  w[2] = __byte_perm(even2, 0x42u, 0x4341u);
  w[3] = __byte_perm(odd2, 0x42u, 0x4341u);
  const __nv_bfloat162 offset = __floats2bfloat162_rn(35.75f, 35.75f);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __nv_bfloat162 v;
    memcpy(&v, &w[i], sizeof(v));
    v = __hsub2(v, offset);
    memcpy(&w[i], &v, sizeof(v));
  }
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t bf16x2_bits(__nv_bfloat162 v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// The three bf16 terms of 8 consecutive x values (hi = bf16(x), mid = bf16(x - hi), lo =
// bf16(x - hi - mid)), each as 8 bf16 in a uint4.
__device__ __forceinline__ void split_x8(const float (&v)[kCodesz], uint4& hi, uint4& mid, uint4& lo) {
  uint32_t h[4], m[4], l[4];
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const __nv_bfloat162 hi2 = __floats2bfloat162_rn(v[2 * p], v[2 * p + 1]);
    const float2 hi_f = __bfloat1622float2(hi2);
    const float r0 = v[2 * p] - hi_f.x, r1 = v[2 * p + 1] - hi_f.y;
    const __nv_bfloat162 mid2 = __floats2bfloat162_rn(r0, r1);
    const float2 mid_f = __bfloat1622float2(mid2);
    h[p] = bf16x2_bits(hi2);
    m[p] = bf16x2_bits(mid2);
    l[p] = bf16x2_bits(__floats2bfloat162_rn(r0 - mid_f.x, r1 - mid_f.y));
  }
  hi = make_uint4(h[0], h[1], h[2], h[3]);
  mid = make_uint4(m[0], m[1], m[2], m[3]);
  lo = make_uint4(l[0], l[1], l[2], l[3]);
}

// Shared layout of matvec_mma's x terms, in 16-byte units (a code column's 8 bf16 values):
// code column c of a term row sits at unit c + c / 8, and term rows are term_row_units()
// apart, 4 mod 8. A warp's B-fragment loads (lanes t: columns 8 apart; lanes g: term rows)
// then fall in different banks instead of all in the same four.
__host__ __device__ __forceinline__ int term_row_units(int groups) {
  const int units = groups + groups / 8;
  return units + ((4 - units) & 7);
}

__device__ __forceinline__ int term_unit(int col) { return col + col / 8; }

// out (k, m) = x (k, 8 groups) W^T, k <= kMmaMaxK, groups % 8 == 0. grid: ceil(m / (16 TILES))
// CTAs of kMmaWarps warps, each owning TILES tiles of 16 rows (the x split and every B
// fragment serve all of them). Lane (g, t) = (lane / 4, lane % 4) decodes rows g and g + 8
// of each tile and, as B column g, reads x term g (row g / 3, term g % 3; zero for g >= 3 k).
// The next kernel of the stream may launch at the start (early_successor) or once every CTA
// has finished its main loop.
template <typename XT, int TILES>
__global__ void __launch_bounds__(kMmaWarps * 32, kMmaMinBlocks)
matvec_mma_kernel(const XT* __restrict__ x, const uint16_t* __restrict__ codes,
                  const uint32_t* __restrict__ abs_g, int k, int m, int groups,
                  int early_successor, float* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char mma_shared[];
  const int n = groups * kCodesz;
  uint32_t* patterns = reinterpret_cast<uint32_t*>(mma_shared);
  uint32_t* flips = patterns + kPatterns * kPatternCopies;
  const int row_units = term_row_units(groups);
  uint4* terms = reinterpret_cast<uint4*>(mma_shared + kDecodeTableBytes);  // 3 k term rows
  float* partial = reinterpret_cast<float*>(terms + 3 * k * row_units);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * kMmaRows * TILES;
  const uint16_t* codes_g[TILES];
  const uint16_t* codes_h[TILES];
#pragma unroll
  for (int tile = 0; tile < TILES; ++tile) {
    const int first = row0 + tile * kMmaRows;
    codes_g[tile] = codes + static_cast<int64_t>(min(first + g, m - 1)) * groups;
    codes_h[tile] = codes + static_cast<int64_t>(min(first + g + 8, m - 1)) * groups;
  }
  // Lane t's 8 codes of rows g, g + 8 of every tile at code column base + 8 t (zero past
  // the last column), all loads in flight before the first decode.
  uint4 cg[TILES], ch[TILES];
  const auto load_codes = [&](int base) {
    const int col0 = base + 8 * t;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int tile = 0; tile < TILES; ++tile) {
      cg[tile] = col0 < groups ? __ldg(reinterpret_cast<const uint4*>(codes_g[tile] + col0)) : zero;
      ch[tile] = col0 < groups ? __ldg(reinterpret_cast<const uint4*>(codes_h[tile] + col0)) : zero;
    }
  };
  if (early_successor) harp_launch::allow_dependents();
  load_codes(32 * warp);  // the first codes and the tables before x exists
  fill_decode_tables(abs_g, patterns, flips);
  harp_launch::wait_for_predecessor();  // x is the input transform's output
  for (int j = 0; j < k; ++j) {
    uint4* hi_row = terms + 3 * j * row_units;
    const XT* x_row = x + static_cast<int64_t>(j) * n;
    for (int col0 = threadIdx.x; col0 < groups; col0 += kMmaSplitUnroll * blockDim.x) {
      float v[kMmaSplitUnroll][kCodesz];  // all loads in flight before the first use
#pragma unroll
      for (int u = 0; u < kMmaSplitUnroll; ++u) {
        const int col = col0 + u * blockDim.x;
        if (col < groups) load_x8(x_row + kCodesz * col, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kMmaSplitUnroll; ++u) {
        const int col = col0 + u * blockDim.x;
        if (col < groups) {
          uint4 hi, mid, lo;
          split_x8(v[u], hi, mid, lo);
          hi_row[term_unit(col)] = hi;
          hi_row[row_units + term_unit(col)] = mid;
          hi_row[2 * row_units + term_unit(col)] = lo;
        }
      }
    }
  }
  __syncthreads();

  const bool has_term = g < 3 * k;
  const uint4* term = terms + (has_term ? g : 0) * row_units;
  float d[TILES][4] = {};
  const LaneTables tables = lane_tables(patterns, flips, lane);
  // The loop bound is the warp's (mma.sync needs the whole warp): a lane past the last
  // code column decodes code 0 and multiplies it by a zero B.
  for (int base = 32 * warp; base < groups; base += 32 * kMmaWarps) {
    if (base != 32 * warp) load_codes(base);
    const int col0 = base + 8 * t;
    const bool valid = col0 < groups;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint4 b = has_term && valid ? term[term_unit(col0) + j] : zero;  // col0 % 8 == 0
#pragma unroll
      for (int tile = 0; tile < TILES; ++tile) {
        const uint32_t words_g[4] = {cg[tile].x, cg[tile].y, cg[tile].z, cg[tile].w};
        const uint32_t words_h[4] = {ch[tile].x, ch[tile].y, ch[tile].z, ch[tile].w};
        uint32_t wg[4], wh[4];
        e8p12_bf16_pairs(words_g[j / 2], 2 * (j % 2), tables, wg);
        e8p12_bf16_pairs(words_h[j / 2], 2 * (j % 2), tables, wh);
        mma_bf16(d[tile], wg[0], wh[0], wg[1], wh[1], b.x, b.y);
        mma_bf16(d[tile], wg[2], wh[2], wg[3], wh[3], b.z, b.w);
      }
    }
  }
  if (!early_successor) harp_launch::allow_dependents();
  // d: rows g, g + 8 x columns 2t, 2t + 1 of this warp's share of each tile; sum the
  // warps, then the terms, one tile at a time.
  float* mine = partial + warp * kMmaRows * 8;
#pragma unroll
  for (int tile = 0; tile < TILES; ++tile) {
    if (tile > 0) __syncthreads();  // the previous tile's sums have been read
    mine[g * 8 + 2 * t] = d[tile][0];
    mine[g * 8 + 2 * t + 1] = d[tile][1];
    mine[(g + 8) * 8 + 2 * t] = d[tile][2];
    mine[(g + 8) * 8 + 2 * t + 1] = d[tile][3];
    __syncthreads();
    const int first = row0 + tile * kMmaRows;
    if (threadIdx.x < kMmaRows * k) {
      const int r = threadIdx.x % kMmaRows, j = threadIdx.x / kMmaRows;
      float sum[3] = {0.0f, 0.0f, 0.0f};
      for (int w = 0; w < kMmaWarps; ++w)
        for (int q = 0; q < 3; ++q) sum[q] += partial[(w * kMmaRows + r) * 8 + 3 * j + q];
      if (first + r < m) out[static_cast<int64_t>(j) * m + first + r] = sum[0] + (sum[1] + sum[2]);
    }
  }
}

size_t matvec_mma_shared(int k, int groups) {
  return sizeof(uint4) * 3 * k * term_row_units(groups) + sizeof(float) * kMmaWarps * kMmaRows * 8 +
         kDecodeTableBytes;
}

bool matvec_mma_applies(int mode, int k, int groups, const void* codes) {
  return mode == kModeE8P12 && k <= kMmaMaxK && groups % 8 == 0 &&
         matvec_mma_shared(k, groups) <= static_cast<size_t>(kMmaMaxShared) &&
         reinterpret_cast<uintptr_t>(codes) % 16 == 0;
}

// Row tiles per matvec_mma CTA. Two halve the CTAs that split x into bf16 terms, which pays
// while a CTA's main loop is short; the thresholds are the fastest choice in the batch-1
// decode step of Llama-2-7B and SmolLM2 shapes on an H200 (README, Decode speed): two on
// qkv, o and up of Llama-2-7B, one on its down_proj (11008 columns: a long main loop
// wants twice the CTAs) and on every SmolLM2 shape (fewer than 4096 rows).
int matvec_mma_tiles(int m, int groups) {
  return m >= kMmaTwoTileRows && groups * kCodesz <= kMmaTwoTileMaxCols ? 2 : 1;
}

template <typename XT, int TILES>
int launch_matvec_mma(const void* x, const void* codes, const uint32_t* abs_table, int k, int m,
                      int groups, int early_successor, float* out, cudaStream_t stream) {
  const int rows_per_cta = kMmaRows * TILES;
  return harp_launch::launch_dependent(
      matvec_mma_kernel<XT, TILES>, dim3((m + rows_per_cta - 1) / rows_per_cta), kMmaWarps * 32,
      matvec_mma_shared(k, groups), stream, static_cast<const XT*>(x),
      static_cast<const uint16_t*>(codes), abs_table, k, m, groups, early_successor, out);
}

template <typename XT>
int dispatch_matvec_mma(const void* x, const void* codes, const uint32_t* abs_table, int k, int m,
                        int groups, int early_successor, float* out, cudaStream_t stream) {
  if (matvec_mma_tiles(m, groups) == 2)
    return launch_matvec_mma<XT, 2>(x, codes, abs_table, k, m, groups, early_successor, out, stream);
  return launch_matvec_mma<XT, 1>(x, codes, abs_table, k, m, groups, early_successor, out, stream);
}

// ---------------------------------------------------------------- launchers

template <int MODE, typename OutT>
int launch_decode(const void* codes, const uint32_t* abs_table, const float* table2,
                  double resid_scale, int64_t total, void* out, cudaStream_t stream) {
  using CodeT = typename CodeType<MODE>::type;
  const int64_t wanted = (total + kDecodeThreads - 1) / kDecodeThreads;
  const int blocks = static_cast<int>(wanted < kDecodeMaxBlocks ? wanted : kDecodeMaxBlocks);
  decode_kernel<MODE, OutT><<<blocks, kDecodeThreads, 0, stream>>>(
      static_cast<const CodeT*>(codes), abs_table, table2, resid_scale, total,
      static_cast<OutT*>(out));
  return static_cast<int>(cudaGetLastError());
}

template <int K, int MODE, typename XT>
int launch_matvec(const void* x, const void* codes, const uint32_t* abs_table,
                  const float* table2, float inv_resid_scale, int k, int m, int groups,
                  float* out, cudaStream_t stream) {
  using CodeT = typename CodeType<MODE>::type;
  constexpr int rows_per_block = kWarpsPerBlock * kRowsPerWarp;
  const int blocks = (m + rows_per_block - 1) / rows_per_block;
  matvec_kernel<K, MODE, XT><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const XT*>(x), static_cast<const CodeT*>(codes), abs_table, table2,
      inv_resid_scale, k, m, groups, out);
  return static_cast<int>(cudaGetLastError());
}

template <int MODE, typename XT>
int dispatch_matvec_k(const void* x, const void* codes, const uint32_t* abs_table,
                      const float* table2, float inv_resid_scale, int k, int m, int groups,
                      float* out, cudaStream_t stream) {
  if (k == 1)
    return launch_matvec<1, MODE, XT>(x, codes, abs_table, table2, inv_resid_scale, k, m, groups, out, stream);
  if (k == 2)
    return launch_matvec<2, MODE, XT>(x, codes, abs_table, table2, inv_resid_scale, k, m, groups, out, stream);
  if (k <= 4)
    return launch_matvec<4, MODE, XT>(x, codes, abs_table, table2, inv_resid_scale, k, m, groups, out, stream);
  return launch_matvec<8, MODE, XT>(x, codes, abs_table, table2, inv_resid_scale, k, m, groups, out, stream);
}

template <typename XT>
int dispatch_matvec(int mode, const void* x, const void* codes, const uint32_t* abs_table,
                    const float* table2, float inv_resid_scale, int k, int m, int groups,
                    float* out, cudaStream_t stream) {
  switch (mode) {
    case kModeE8P12:
      return dispatch_matvec_k<kModeE8P12, XT>(x, codes, abs_table, table2, inv_resid_scale, k, m, groups, out, stream);
    case kModeRVQ4B:
      return dispatch_matvec_k<kModeRVQ4B, XT>(x, codes, abs_table, table2, inv_resid_scale, k, m, groups, out, stream);
    case kModeRVQ3B:
      return dispatch_matvec_k<kModeRVQ3B, XT>(x, codes, abs_table, table2, inv_resid_scale, k, m, groups, out, stream);
    default:
      return kErrBadArgument;
  }
}

}  // namespace quiptools

// ---------------------------------------------------------------- C ABI

extern "C" {

// 0 on success, a cudaError_t value (> 0), or -1 for arguments the launcher refuses.
const char* quiptools_error_string(int error) {
  if (error == quiptools::kErrBadArgument) return "quiptools: invalid launcher argument";
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

// Decode `total` codes (mode 0: uint16/int16, modes 1-2: int32) into out (total * 8 values):
// fp16 when out_half (mode 0 only), else fp32. table2: mode 2's (256, 8) fp32 table.
int quiptools_decode(int mode, const void* codes, const int32_t* abs_table, const float* table2,
                     double resid_scale, int64_t total, void* out, int out_half, void* stream) {
  using namespace quiptools;
  if (total < 0 || (out_half && mode != kModeE8P12)) return kErrBadArgument;
  if (mode == kModeRVQ3B && table2 == nullptr) return kErrBadArgument;
  if (total == 0) return 0;
  const uint32_t* abs_u = reinterpret_cast<const uint32_t*>(abs_table);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (mode) {
    case kModeE8P12:
      return out_half ? launch_decode<kModeE8P12, __half>(codes, abs_u, table2, resid_scale, total, out, s)
                      : launch_decode<kModeE8P12, float>(codes, abs_u, table2, resid_scale, total, out, s);
    case kModeRVQ4B:
      return launch_decode<kModeRVQ4B, float>(codes, abs_u, table2, resid_scale, total, out, s);
    case kModeRVQ3B:
      return launch_decode<kModeRVQ3B, float>(codes, abs_u, table2, resid_scale, total, out, s);
    default:
      return kErrBadArgument;
  }
}

// out (k, m) fp32 = x (k, 8 groups) . W^T, 1 <= k <= 8; x fp32 (x_half = 0) or fp16, both
// row-major, contiguous and 16-byte aligned; codes (m, groups) row-major. early_successor:
// where the tensor-core kernel lets the next kernel of the stream launch (1: at its start,
// 0: after its main loop; dependent_launch.cuh); the result is the same.
int quiptools_matvec(int mode, const void* x, int x_half, const void* codes,
                     const int32_t* abs_table, const float* table2, float resid_scale, int k,
                     int m, int groups, int early_successor, float* out, void* stream) {
  using namespace quiptools;
  if (k < 1 || k > 8 || m < 0 || groups < 0) return kErrBadArgument;
  if (mode == kModeRVQ3B && table2 == nullptr) return kErrBadArgument;
  if (mode == kModeRVQ4B && !(resid_scale > 0.0f)) return kErrBadArgument;
  if (m == 0) return 0;
  if (groups == 0) return static_cast<int>(cudaMemsetAsync(out, 0, sizeof(float) * k * m,
                                                           static_cast<cudaStream_t>(stream)));
  const uint32_t* abs_u = reinterpret_cast<const uint32_t*>(abs_table);
  const float inv = mode == kModeRVQ4B ? 1.0f / resid_scale : 1.0f;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (matvec_mma_applies(mode, k, groups, codes))
    return x_half ? dispatch_matvec_mma<__half>(x, codes, abs_u, k, m, groups, early_successor, out, s)
                  : dispatch_matvec_mma<float>(x, codes, abs_u, k, m, groups, early_successor, out, s);
  return x_half ? dispatch_matvec<__half>(mode, x, codes, abs_u, table2, inv, k, m, groups, out, s)
                : dispatch_matvec<float>(mode, x, codes, abs_u, table2, inv, k, m, groups, out, s);
}

}  // extern "C"
