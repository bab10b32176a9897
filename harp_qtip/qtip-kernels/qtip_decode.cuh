// qtip_decode.cuh: the per-thread core of the qtip-kernels (bitstream -> states -> HYB
// points -> products), written once for the device kernels (qtip_kernels.cu) and for the
// host emulation (host_check.cpp, built by the CPU tests with a plain C++ compiler).
//
// Everything here is __host__ __device__ under nvcc and plain inline C++ otherwise; the
// only device-specific parts are the load and bit intrinsics, each with a portable host
// twin of the same result. See qtip_kernels.cu for the storage layout and the design.
#pragma once

#include <stdint.h>
#include <string.h>

#include <cmath>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define QTIP_HD __host__ __device__ __forceinline__
#else
#define QTIP_HD inline
#endif

namespace qtip {

// ---------------------------------------------------------------- the fixed configuration

constexpr int kL = 16;                            // trellis state bits
constexpr int kV = 2;                             // weights per step (HYB)
constexpr int kTlutBits = 9;                      // HYB table: 2^9 2-D points
constexpr int kTlutSize = 1 << kTlutBits;
constexpr int kTileDim = 16;                      // a tile is 16 x 16 weights, one sequence
constexpr int kStepsPerRow = kTileDim / kV;       // 8 steps emit one tile row
constexpr int kReplicas = 16;                     // table copies in shared memory (one per bank pair)
constexpr int kTableSlots = kTlutSize * kReplicas;

template <int K>
struct Config {
  static constexpr int kWordsPerTile = kTileDim * K;   // T K / 16 int16 words (32 / 48 / 64)
  static constexpr int kStepBits = K * kV;             // bits shifted in per step
  // A tile row's bits: its own 16 K bits plus the next 16 (the last state's tail; the last
  // row wraps to the tile's first word), MSB-first in 32-bit registers.
  static constexpr int kRowRegs = (K + 2) / 2;
  static_assert(K >= 2 && K <= 4, "qtip-kernels cover K = 2, 3, 4");
  static_assert(kStepBits < kL, "a step shifts in fewer than L bits");
};

// ---------------------------------------------------------------- portable intrinsics

// Low 32 bits of the 64-bit value (hi:lo) >> shift, 0 <= shift < 32.
QTIP_HD uint32_t funnel_right(uint32_t lo, uint32_t hi, int shift) {
#ifdef __CUDA_ARCH__
  return __funnelshift_r(lo, hi, shift);
#else
  return shift == 0 ? lo : (lo >> shift) | (hi << (32 - shift));
#endif
}

QTIP_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

QTIP_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

QTIP_HD float fma32(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Read-only loads of the packed words (little-endian memory: a 32-bit load of words
// (w0, w1) reads w0 | w1 << 16).
QTIP_HD uint32_t load_u16(const uint16_t* p) {
#ifdef __CUDA_ARCH__
  return static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p)));
#else
  return *p;
#endif
}

QTIP_HD uint32_t load_u32(const uint16_t* p) {  // p 4-byte aligned
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const unsigned int*>(p));
#else
  uint32_t v;
  memcpy(&v, p, sizeof(v));
  return v;
#endif
}

QTIP_HD void load_u32x2(const uint16_t* p, uint32_t& a, uint32_t& b) {  // p 8-byte aligned
#ifdef __CUDA_ARCH__
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  a = v.x;
  b = v.y;
#else
  memcpy(&a, p, sizeof(a));
  memcpy(&b, p + 2, sizeof(b));
#endif
}

// Two little-endian words (w0 | w1 << 16) -> the MSB-first stream order (w0 << 16 | w1).
QTIP_HD uint32_t stream_order(uint32_t le_pair) { return (le_pair << 16) | (le_pair >> 16); }

// Four consecutive x values (16-byte aligned for float, 8 for half) as float.
QTIP_HD void load_x4(const float* p, float (&v)[4]) {
#ifdef __CUDA_ARCH__
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
#else
  memcpy(v, p, sizeof(v));
#endif
}

#ifdef __CUDACC__
__device__ __forceinline__ void load_x4(const __half* p, float (&v)[4]) {
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
  __half2 lo, hi;
  memcpy(&lo, &raw.x, sizeof(lo));
  memcpy(&hi, &raw.y, sizeof(hi));
  const float2 a = __half22float2(lo);
  const float2 b = __half22float2(hi);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
#endif

// ---------------------------------------------------------------- the code (HYB)

struct alignas(8) Point {
  float x;
  float y;
};

// Shared-memory slot of table entry `index` in replica `replica`: entry-major, so the 16
// replicas of an entry are 16 consecutive 8-byte slots and replica q sits in bank pair q
// whatever the entry. A thread reads replica (lane mod 16): the 16 lanes of a half-warp
// never share a bank, whatever entries they read.
QTIP_HD int table_slot(int index, int replica) { return index * kReplicas + replica; }

// A thread's view of the replicated table: the address of its replica of entry 0 (entry
// `index` is 128 index bytes further). On the device a 32-bit shared-memory address read
// with ld.shared (the generic pointer form costs extra uniform-register work per load).
struct LaneTable {
#ifdef __CUDA_ARCH__
  uint32_t address;
#else
  const char* address;
#endif
};

QTIP_HD LaneTable lane_table(const Point* table, int replica) {
  const uint32_t replica_bytes = static_cast<uint32_t>(replica) * static_cast<uint32_t>(sizeof(Point));
#ifdef __CUDA_ARCH__
  return LaneTable{static_cast<uint32_t>(__cvta_generic_to_shared(table)) + replica_bytes};
#else
  return LaneTable{reinterpret_cast<const char*>(table) + replica_bytes};
#endif
}

// The table point 2 * half_offset bytes past the thread's replica of entry 0 (one IMAD
// forms the address on the device, where plain C++ gave a shift, a mask and an add).
QTIP_HD Point table_point(LaneTable t, uint32_t half_offset) {
  Point p;
#ifdef __CUDA_ARCH__
  uint32_t address;
  asm("mad.lo.u32 %0, %1, 2, %2;" : "=r"(address) : "r"(half_offset), "r"(t.address));
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(p.x), "=f"(p.y) : "r"(address) : "memory");
#else
  memcpy(&p, t.address + 2 * half_offset, sizeof(p));
#endif
  return p;
}

// HYB (quantlut_sym) of an L = 16 state s held in bits 0..15 of `v` (bits 16..31 may hold
// anything: they only reach bits >= 16 of the product, and HYB reads bits 6..15):
// h = (s + 1) s, index = bits 6..14 of h, the first coordinate negated when bit 15 of h is
// set (an XOR of its sign bit: exactly torch's multiplication by -1, zeros included).
// Entry `index` is 128 index = 2 (h & 0x7FC0) bytes past entry 0.
QTIP_HD Point hyb_point(uint32_t v, LaneTable t) {
  static_assert(kTlutBits == 9 && kReplicas * sizeof(Point) == 128, "offset arithmetic below");
  const uint32_t h = v * v + v;
  Point p = table_point(t, h & 0x7FC0u);
  p.x = bits_float(float_bits(p.x) ^ ((h & 0x8000u) << 16));
  return p;
}

// ---------------------------------------------------------------- bitstream of a tile row

// Tile row r (weights 16 r .. 16 r + 15 = steps 8 r .. 8 r + 7) reads the stream bits
// [16 K r, 16 K r + 16 K + 16): words K r .. K r + K - 1 and the first half of word
// K r + K, which for r = 15 is word 0 (tail-biting). `tile` points at the tile's 16 K
// words. The loads (RowRaw, one or two aligned 32-bit words and one or two 16-bit words)
// are separate from the assembly (row_bits) so that a thread can issue the loads of
// several tile rows before it uses the first.
struct RowRaw {
  uint32_t a, b, c;
};

template <int K>
QTIP_HD RowRaw load_row_raw(const uint16_t* tile, int r) {
  constexpr int words = Config<K>::kWordsPerTile;
  RowRaw raw;
  if constexpr (K == 2) {         // a = words (2r, 2r+1), c = word 2r+2 (mod 32)
    raw.a = load_u32(tile + 2 * r);
    raw.b = 0;
    raw.c = load_u16(tile + ((2 * r + 2) & (words - 1)));
  } else if constexpr (K == 4) {  // a, b = words (4r, 4r+1), (4r+2, 4r+3); c = word 4r+4 (mod 64)
    load_u32x2(tile + 4 * r, raw.a, raw.b);
    raw.c = load_u16(tile + ((4 * r + 4) & (words - 1)));
  } else {  // K == 3: a = the aligned pair (3r, 3r+1) for even r, (3r+1, 3r+2) for odd r;
            // b = the other word (3r+2 or 3r); c = word 3r+3 (mod 48)
    const int odd = r & 1;
    raw.a = load_u32(tile + 3 * r + odd);
    raw.b = load_u16(tile + 3 * r + 2 - 2 * odd);
    raw.c = load_u16(tile + (r == kTileDim - 1 ? 0 : 3 * r + 3));
  }
  return raw;
}

// The row's bits MSB-first: w[0] bits 31..0 = stream bits 16 K r .. 16 K r + 31, and so on.
template <int K>
QTIP_HD void row_bits(const RowRaw& raw, int r, uint32_t (&w)[Config<K>::kRowRegs]) {
  if constexpr (K == 2) {
    w[0] = stream_order(raw.a);
    w[1] = raw.c << 16;
  } else if constexpr (K == 4) {
    w[0] = stream_order(raw.a);
    w[1] = stream_order(raw.b);
    w[2] = raw.c << 16;
  } else {
    const uint32_t lo16 = raw.a & 0xFFFFu;  // word 3r (even r) or 3r+1 (odd r)
    const uint32_t hi16 = raw.a >> 16;      // word 3r+1 (even r) or 3r+2 (odd r)
    const bool odd = r & 1;
    w[0] = odd ? (raw.b << 16) | lo16 : (lo16 << 16) | hi16;
    w[1] = odd ? (hi16 << 16) | raw.c : (raw.b << 16) | raw.c;
  }
}

template <int K>
QTIP_HD void load_row_bits(const uint16_t* tile, int r, uint32_t (&w)[Config<K>::kRowRegs]) {
  row_bits<K>(load_row_raw<K>(tile, r), r, w);
}

// State of step q (0..7) of a tile row, the 16-bit window at row-bit offset 2 K q, in bits
// 0..15 of the result (one shift; the bits above are left-over stream bits, see hyb_point).
template <int K>
QTIP_HD uint32_t row_state(const uint32_t (&w)[Config<K>::kRowRegs], int q) {
  const int end = Config<K>::kStepBits * q + kL;  // row-bit offset just past the window
  const int reg = (end - 1) >> 5;                  // register holding the window's last bit
  const int shift = 32 * (reg + 1) - end;          // 0..31
  return reg == 0 ? w[0] >> shift : funnel_right(w[reg], w[reg - 1], shift);
}

// The 16 weights of a tile row (columns 0..15), exact fp32.
template <int K>
QTIP_HD void decode_row(const uint32_t (&w)[Config<K>::kRowRegs], LaneTable lane,
                        float (&v)[kTileDim]) {
#pragma unroll
  for (int q = 0; q < kStepsPerRow; ++q) {
    const Point p = hyb_point(row_state<K>(w, q), lane);
    v[2 * q] = p.x;
    v[2 * q + 1] = p.y;
  }
}

// acc[j] += x_j[c0 .. c0 + 15] . (the tile row's 16 weights) for the x rows j < k (KR >= k),
// `x_tile` = x + c0, row stride n. One FMA chain per x row, in column order.
template <int K, int KR, typename XT>
QTIP_HD void accumulate_row(const uint32_t (&w)[Config<K>::kRowRegs], const XT* x_tile,
                            int64_t n, int k, LaneTable lane, float (&acc)[KR]) {
#pragma unroll
  for (int c = 0; c < kTileDim / 4; ++c) {  // 4 columns = 2 steps
    const Point p0 = hyb_point(row_state<K>(w, 2 * c), lane);
    const Point p1 = hyb_point(row_state<K>(w, 2 * c + 1), lane);
#pragma unroll
    for (int j = 0; j < KR; ++j) {
      if (j < k) {
        float xv[4];
        load_x4(x_tile + j * n + 4 * c, xv);
        float a = acc[j];
        a = fma32(xv[0], p0.x, a);
        a = fma32(xv[1], p0.y, a);
        a = fma32(xv[2], p1.x, a);
        a = fma32(xv[3], p1.y, a);
        acc[j] = a;
      }
    }
  }
}

// x rows bucket of a launch: the matvec kernel is compiled for KR = 1, 2, 4, 8 rows.
QTIP_HD int rows_bucket(int k) { return k <= 1 ? 1 : k <= 2 ? 2 : k <= 4 ? 4 : 8; }

// ---------------------------------------------------------------- matvec work mapping

// Block = kMatvecWarps warps working on one 16-row stripe of W' at a time (a persistent
// grid walks the stripes: stripe = blockIdx.x, += gridDim.x). Lane = 16 h + r: half-warp h
// of warp w takes the tile columns j = 2 w + h + 16 u (u = 0, 1, ...), lane r row r of
// each. A thread loads the raw words of `MatvecBatch<KR>::kRows` tile rows before it decodes
// the first (memory-level parallelism: a stripe of a 4096-wide K = 2 matrix is only 16 KB).
// The per-lane sums are combined in a fixed order: the two half-warps (one shuffle), then
// warps 0..7 in order, so the result is deterministic.
constexpr int kMatvecWarps = 8;
constexpr int kMatvecThreads = 32 * kMatvecWarps;
constexpr int kTileColumnsPerPass = 2 * kMatvecWarps;

template <int KR>
struct MatvecBatch {
  static constexpr int kRows = KR <= 2 ? 8 : 4;
  // __launch_bounds__ minimum blocks per SM: 3 (the shared-memory limit) caps registers at
  // 80; KR = 8 (fp32-FMA bound) would spill there and gets 2 (at most 128 registers).
  static constexpr int kMinBlocks = KR == 8 ? 2 : 3;
};

}  // namespace qtip
