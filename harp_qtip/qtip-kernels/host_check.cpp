// Host emulation of the qtip-kernels, for tests without a GPU.
//
// Built by harp_qtip/tests/test_qtip_kernels.py with a plain C++ compiler:
//   g++ -O2 -std=c++17 -shared -fPIC host_check.cpp -o libqtip_host_check.so
// It runs the kernels' own per-thread code (qtip_decode.cuh: loads, bit assembly, windows,
// HYB hash, replicated-table addressing, the FMA chain) over every thread of the launch,
// in the kernels' work mapping and reduction order, with plain loops instead of threads.
// So the CPU tests catch indexing and bit-order bugs of the device code, and a GPU test
// can compare the device results with these bit for bit.
#include <stdint.h>

#include <vector>

#include "qtip_decode.cuh"

namespace {

using namespace qtip;

std::vector<Point> replicated_table(const float* tlut) {
  std::vector<Point> table(kTableSlots);
  for (int e = 0; e < kTlutSize; ++e)
    for (int q = 0; q < kReplicas; ++q) table[table_slot(e, q)] = Point{tlut[2 * e], tlut[2 * e + 1]};
  return table;
}

template <int K>
void decode(const uint16_t* packed, const float* tlut, int m, int n, float* out) {
  const std::vector<Point> table = replicated_table(tlut);
  const int64_t tiles_n = n / kTileDim;
  const int64_t total = static_cast<int64_t>(m / kTileDim) * tiles_n * kTileDim;
  for (int64_t g = 0; g < total; ++g) {  // g = the kernel's global thread index
    const int64_t tile = g / kTileDim;
    const int r = static_cast<int>(g % kTileDim);
    const int64_t i = tile / tiles_n;
    const int64_t j = tile - i * tiles_n;
    uint32_t w[Config<K>::kRowRegs];
    load_row_bits<K>(packed + tile * Config<K>::kWordsPerTile, r, w);
    float v[kTileDim];
    decode_row<K>(w, lane_table(table.data(), r), v);  // replica = thread index mod 16 = r
    float* dst = out + (i * kTileDim + r) * n + j * kTileDim;
    for (int c = 0; c < kTileDim; ++c) dst[c] = v[c];
  }
}

template <int K, int KR>
void matvec(const float* x, int k, const uint16_t* packed, const float* tlut, int m, int n,
            float* out) {
  constexpr int words = Config<K>::kWordsPerTile;
  constexpr int D = MatvecBatch<KR>::kRows;
  const std::vector<Point> table = replicated_table(tlut);
  const int tiles_n = n / kTileDim;
  const int stripes = m / kTileDim;
  const int64_t stripe_words = static_cast<int64_t>(tiles_n) * words;
  for (int stripe = 0; stripe < stripes; ++stripe) {
    float lane_acc[kMatvecWarps][32][KR];
    for (int warp = 0; warp < kMatvecWarps; ++warp) {
      for (int lane = 0; lane < 32; ++lane) {
        const int r = lane & (kTileDim - 1);
        const int j0 = 2 * warp + (lane >> 4);
        float* acc_out = lane_acc[warp][lane];
        float acc[KR];
        for (int t = 0; t < KR; ++t) acc[t] = 0.0f;
        for (int jb = j0; jb < tiles_n; jb += D * kTileColumnsPerPass) {
          RowRaw raw[D] = {};
          for (int d = 0; d < D; ++d) {
            const int j = jb + d * kTileColumnsPerPass;
            if (j < tiles_n)
              raw[d] = load_row_raw<K>(packed + stripe * stripe_words + static_cast<int64_t>(j) * words, r);
          }
          for (int d = 0; d < D; ++d) {
            const int j = jb + d * kTileColumnsPerPass;
            if (j < tiles_n) {
              uint32_t w[Config<K>::kRowRegs];
              row_bits<K>(raw[d], r, w);
              accumulate_row<K, KR, float>(w, x + static_cast<int64_t>(j) * kTileDim, n, k,
                                           lane_table(table.data(), r), acc);
            }
          }
        }
        for (int t = 0; t < KR; ++t) acc_out[t] = acc[t];
      }
    }
    // The kernel: acc += shfl_xor(acc, 16) (lane r of the first half-warp: own + partner),
    // partial[warp][t][r] from lanes 0..15, then sum over warps 0..7 in order.
    for (int t = 0; t < k; ++t) {
      for (int r = 0; r < kTileDim; ++r) {
        float sum = 0.0f;
        for (int warp = 0; warp < kMatvecWarps; ++warp) {
          const float partial = lane_acc[warp][r][t] + lane_acc[warp][r + 16][t];
          sum = warp == 0 ? partial : sum + partial;
        }
        out[static_cast<int64_t>(t) * m + stripe * kTileDim + r] = sum;
      }
    }
  }
}

template <int K>
void matvec_rows(const float* x, int k, const uint16_t* packed, const float* tlut, int m, int n,
                 float* out) {
  switch (rows_bucket(k)) {
    case 1: return matvec<K, 1>(x, k, packed, tlut, m, n, out);
    case 2: return matvec<K, 2>(x, k, packed, tlut, m, n, out);
    case 4: return matvec<K, 4>(x, k, packed, tlut, m, n, out);
    default: return matvec<K, 8>(x, k, packed, tlut, m, n, out);
  }
}

bool bad(int K, int m, int n) {
  return K < 2 || K > 4 || m < 0 || n < 0 || m % kTileDim || n % kTileDim;
}

}  // namespace

extern "C" {

// W' (m, n) fp32 of packed (m/16 * n/16, 16 K) int16 words with the (512, 2) fp32 table.
// 0 on success, -1 for bad arguments.
int qtip_host_decode(int K, const uint16_t* packed, const float* tlut, int m, int n, float* out) {
  if (bad(K, m, n)) return -1;
  switch (K) {
    case 2: decode<2>(packed, tlut, m, n, out); break;
    case 3: decode<3>(packed, tlut, m, n, out); break;
    default: decode<4>(packed, tlut, m, n, out); break;
  }
  return 0;
}

// out (k, m) fp32 = x (k, n) fp32 . W'^T, 1 <= k <= 8, in the matvec kernel's order.
int qtip_host_matvec(int K, const float* x, int k, const uint16_t* packed, const float* tlut,
                     int m, int n, float* out) {
  if (bad(K, m, n) || k < 1 || k > 8) return -1;
  switch (K) {
    case 2: matvec_rows<2>(x, k, packed, tlut, m, n, out); break;
    case 3: matvec_rows<3>(x, k, packed, tlut, m, n, out); break;
    default: matvec_rows<4>(x, k, packed, tlut, m, n, out); break;
  }
  return 0;
}

}  // extern "C"
