// PyTorch binding of the qtip-kernels launchers (qtip_kernels.cu).
//
// No CUDA headers here: the caller passes the CUDA stream as an integer
// (torch.cuda.current_stream(device).cuda_stream), so this file builds against any torch.
// harp_qtip/lib/linear/kernels.py is the public API; these functions check every tensor
// and raise on misuse (they never fall back to another path).
#include <torch/extension.h>

#include "transforms_binding.h"

#include <cstdint>

extern "C" {
const char* qtip_kernels_error_string(int error);
int qtip_kernels_decode(int K, const void* packed, const void* tlut, int tlut_half, int m, int n,
                        void* out, int out_half, void* stream);
int qtip_kernels_matvec(int K, const void* x, int x_half, const void* packed, const void* tlut,
                        int tlut_half, int k, int m, int n, int early_successor, float* out,
                        void* stream);
}

namespace {

using harp_transforms::text;

constexpr int64_t kTile = 16;
constexpr int64_t kTlutSize = 512;
constexpr int64_t kMaxRows = 8;

void check_launch(int error, const char* what) {
  TORCH_CHECK(error == 0, "qtip_kernels.", what, " failed: ", qtip_kernels_error_string(error));
}

void check_cuda_on(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), "qtip_kernels: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "qtip_kernels: ", name, " is on ", t.device(),
              ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous(), "qtip_kernels: ", name, " must be contiguous");
}

void check_aligned(const torch::Tensor& t, int64_t bytes, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0, "qtip_kernels: ", name,
              " must be ", text(bytes), "-byte aligned");
}

// packed (m/16 * n/16, 16 K) int16 and tlut (512, 2) fp32/fp16 on one device; K in 2..4.
void check_codes(const torch::Tensor& packed, const torch::Tensor& tlut, int64_t m, int64_t n,
                 int64_t K) {
  TORCH_CHECK(K >= 2 && K <= 4, "qtip_kernels: K must be 2, 3 or 4, got ", text(K));
  TORCH_CHECK(m >= 0 && n >= 0 && m % kTile == 0 && n % kTile == 0,
              "qtip_kernels: m and n must be multiples of 16, got m=", text(m), ", n=", text(n));
  TORCH_CHECK(m <= INT32_MAX && n <= INT32_MAX, "qtip_kernels: m, n too large");
  check_cuda_on(packed, packed, "packed");
  TORCH_CHECK(packed.scalar_type() == torch::kInt16, "qtip_kernels: packed must be int16, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == (m / kTile) * (n / kTile) &&
                  packed.size(1) == kTile * K,
              "qtip_kernels: packed must be (m/16 * n/16, 16 K) = (",
              text((m / kTile) * (n / kTile)), ", ", text(kTile * K), ") for m=", text(m),
              ", n=", text(n), ", K=", text(K), "; got ", text(packed.sizes()));
  check_aligned(packed, 8, "packed");
  check_cuda_on(tlut, packed, "tlut");
  TORCH_CHECK(tlut.scalar_type() == torch::kFloat32 || tlut.scalar_type() == torch::kFloat16,
              "qtip_kernels: tlut must be float32 or float16, got ", tlut.scalar_type());
  TORCH_CHECK(tlut.dim() == 2 && tlut.size(0) == kTlutSize && tlut.size(1) == 2,
              "qtip_kernels: tlut must be the (512, 2) HYB table (tlut_bits 9), got ",
              text(tlut.sizes()));
  check_aligned(tlut, 8, "tlut");
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// W' (m, n) of the packed trellis: fp16 if out_half, else fp32; exact.
torch::Tensor decode(torch::Tensor packed, torch::Tensor tlut, int64_t m, int64_t n, int64_t K,
                     bool out_half, int64_t stream) {
  check_codes(packed, tlut, m, n, K);
  auto out = torch::empty({m, n}, packed.options().dtype(out_half ? torch::kFloat16 : torch::kFloat32));
  check_launch(qtip_kernels_decode(static_cast<int>(K), packed.data_ptr(), tlut.data_ptr(),
                                   tlut.scalar_type() == torch::kFloat16 ? 1 : 0,
                                   static_cast<int>(m), static_cast<int>(n), out.data_ptr(),
                                   out_half ? 1 : 0, as_stream(stream)),
               "decode");
  return out;
}

// out (k, m) fp32 = x (k, n) W'^T, 1 <= k <= 8, x fp32 or fp16. early_successor: where the
// kernel lets the stream's next kernel launch (qtip_kernels_matvec).
torch::Tensor matvec(torch::Tensor x, torch::Tensor packed, torch::Tensor tlut, int64_t m,
                     int64_t n, int64_t K, bool early_successor, int64_t stream) {
  check_codes(packed, tlut, m, n, K);
  check_cuda_on(x, packed, "x");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat16,
              "qtip_kernels: x must be float32 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows && x.size(1) == n,
              "qtip_kernels: x must be (k, n) with 1 <= k <= ", text(kMaxRows), " and n=", text(n),
              ", got ", text(x.sizes()));
  check_aligned(x, 16, "x");
  auto out = torch::empty({x.size(0), m}, x.options().dtype(torch::kFloat32));
  check_launch(qtip_kernels_matvec(static_cast<int>(K), x.data_ptr(),
                                   x.scalar_type() == torch::kFloat16 ? 1 : 0, packed.data_ptr(),
                                   tlut.data_ptr(), tlut.scalar_type() == torch::kFloat16 ? 1 : 0,
                                   static_cast<int>(x.size(0)), static_cast<int>(m),
                                   static_cast<int>(n), early_successor ? 1 : 0,
                                   out.data_ptr<float>(), as_stream(stream)),
               "matvec");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qtip_kernels: HYB trellis decode and fused decode-matvec (L 16, V 2, K 2-4)";
  m.attr("MAX_MATVEC_ROWS") = kMaxRows;
  m.attr("TLUT_SIZE") = kTlutSize;
  m.def("decode", &decode, "W' (m, n) of packed (m/16 * n/16, 16 K) int16 codes", py::arg("packed"),
        py::arg("tlut"), py::arg("m"), py::arg("n"), py::arg("K"), py::arg("out_half"),
        py::arg("stream"));
  m.def("matvec", &matvec, "x (k, n) . W'^T as fp32 (k, m), 1 <= k <= 8", py::arg("x"),
        py::arg("packed"), py::arg("tlut"), py::arg("m"), py::arg("n"), py::arg("K"),
        py::arg("early_successor"), py::arg("stream"));
  harp_transforms::register_functions(m);
}
