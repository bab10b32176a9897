// PyTorch binding of the quiptools launchers (quiptools.cu).
//
// No CUDA headers here: the caller passes the CUDA stream as an integer
// (torch.cuda.current_stream(device).cuda_stream) and the abs table as a tensor, so
// this file builds against any torch (checked with a CPU-only torch: it compiles, links
// against libcudart and imports). lib/linear/kernels.py is the public API; these
// functions check every tensor and raise on misuse, they never fall back.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "transforms_binding.h"

#include <cstdint>
#include <optional>

extern "C" {
const char* quiptools_error_string(int error);
int quiptools_decode(int mode, const void* codes, const int32_t* abs_table, const float* table2,
                     double resid_scale, int64_t total, void* out, int out_half, void* stream);
int quiptools_matvec(int mode, const void* x, int x_half, const void* codes,
                     const int32_t* abs_table, const float* table2, float resid_scale, int k,
                     int m, int groups, int early_successor, float* out, void* stream);
}

namespace {

using harp_transforms::text;

constexpr int64_t kModeE8P12 = 0;
constexpr int64_t kModeRVQ4B = 1;
constexpr int64_t kModeRVQ3B = 2;
constexpr int64_t kCodesz = 8;
constexpr int64_t kMaxRows = 8;

void check_launch(int error, const char* what) {
  TORCH_CHECK(error == 0, "quiptools.", what, " failed: ", quiptools_error_string(error));
}

void check_cuda_on(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), "quiptools: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "quiptools: ", name, " is on ", t.device(),
              ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous(), "quiptools: ", name, " must be contiguous");
}

torch::ScalarType code_dtype(int64_t mode) {
  return mode == kModeE8P12 ? torch::kInt16 : torch::kInt32;
}

using OptTensor = std::optional<torch::Tensor>;

void check_mode_tables(int64_t mode, const torch::Tensor& codes, const torch::Tensor& abs_table,
                       const OptTensor& table2, double resid_scale) {
  TORCH_CHECK(mode == kModeE8P12 || mode == kModeRVQ4B || mode == kModeRVQ3B,
              "quiptools: unknown mode ", text(mode));
  check_cuda_on(codes, codes, "codes");
  TORCH_CHECK(codes.scalar_type() == code_dtype(mode), "quiptools: codes of mode ", text(mode),
              " must be ", code_dtype(mode), ", got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2, "quiptools: codes must be 2-D (m, n / 8), got ",
              text(codes.sizes()));
  check_cuda_on(abs_table, codes, "abs_table");
  TORCH_CHECK(abs_table.scalar_type() == torch::kInt32 && abs_table.numel() == 256,
              "quiptools: abs_table must be the 256 int32 packed_abs_table()");
  if (mode == kModeRVQ3B) {
    TORCH_CHECK(table2.has_value(), "quiptools: mode 2 (E8P12RVQ3B) needs table2");
    check_cuda_on(*table2, codes, "table2");
    TORCH_CHECK(table2->scalar_type() == torch::kFloat32 && table2->numel() == 256 * kCodesz,
                "quiptools: table2 must be the (256, 8) float32 scaled stage-2 table");
  }
  if (mode == kModeRVQ4B)
    TORCH_CHECK(resid_scale > 0.0, "quiptools: resid_scale must be > 0, got ", text(resid_scale));
}

const float* table2_ptr(int64_t mode, const OptTensor& table2) {
  return mode == kModeRVQ3B ? table2->data_ptr<float>() : nullptr;
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// Decoded points (m, 8 g) of codes (m, g): fp16 if out_half (mode 0 only), else fp32.
torch::Tensor decode(torch::Tensor codes, torch::Tensor abs_table, int64_t mode,
                     OptTensor table2, double resid_scale, bool out_half, int64_t stream) {
  check_mode_tables(mode, codes, abs_table, table2, resid_scale);
  TORCH_CHECK(!out_half || mode == kModeE8P12,
              "quiptools: fp16 output only for E8P12 (residual points are not exact in fp16)");
  auto out = torch::empty({codes.size(0), codes.size(1) * kCodesz},
                          codes.options().dtype(out_half ? torch::kFloat16 : torch::kFloat32));
  check_launch(quiptools_decode(static_cast<int>(mode), codes.data_ptr(),
                                abs_table.data_ptr<int32_t>(), table2_ptr(mode, table2),
                                resid_scale, codes.numel(), out.data_ptr(), out_half ? 1 : 0,
                                as_stream(stream)),
               "decode");
  return out;
}

// out (k, m) fp32 = x (k, n) W^T for W the decoded codes (m, n / 8); 1 <= k <= 8.
// early_successor: where the kernel lets the stream's next kernel launch (quiptools_matvec).
torch::Tensor matvec(torch::Tensor x, torch::Tensor codes, torch::Tensor abs_table, int64_t mode,
                     OptTensor table2, double resid_scale, bool early_successor, int64_t stream) {
  check_mode_tables(mode, codes, abs_table, table2, resid_scale);
  check_cuda_on(x, codes, "x");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat16,
              "quiptools: x must be float32 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows,
              "quiptools: x must be (k, n) with 1 <= k <= ", text(kMaxRows), ", got ",
              text(x.sizes()));
  TORCH_CHECK(x.size(1) == codes.size(1) * kCodesz, "quiptools: x has ", text(x.size(1)),
              " columns, the codes decode to ", text(codes.size(1) * kCodesz));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "quiptools: x must be 16-byte aligned");
  TORCH_CHECK(codes.size(0) <= INT32_MAX && codes.size(1) <= INT32_MAX / kCodesz,
              "quiptools: codes too large for the matvec kernel");
  auto out = torch::empty({x.size(0), codes.size(0)}, x.options().dtype(torch::kFloat32));
  check_launch(quiptools_matvec(static_cast<int>(mode), x.data_ptr(),
                                x.scalar_type() == torch::kFloat16 ? 1 : 0, codes.data_ptr(),
                                abs_table.data_ptr<int32_t>(), table2_ptr(mode, table2),
                                static_cast<float>(resid_scale), static_cast<int>(x.size(0)),
                                static_cast<int>(codes.size(0)), static_cast<int>(codes.size(1)),
                                early_successor ? 1 : 0, out.data_ptr<float>(), as_stream(stream)),
               "matvec");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "quiptools: E8P12 (+ residual) decode, fused decode-matvec and rotation CUDA kernels";
  m.attr("MODE_E8P12") = kModeE8P12;
  m.attr("MODE_RVQ4B") = kModeRVQ4B;
  m.attr("MODE_RVQ3B") = kModeRVQ3B;
  m.attr("MAX_MATVEC_ROWS") = kMaxRows;
  m.def("decode", &decode, "decoded points (m, 8 g) of codes (m, g)", py::arg("codes"),
        py::arg("abs_table"), py::arg("mode"), py::arg("table2"), py::arg("resid_scale"),
        py::arg("out_half"), py::arg("stream"));
  m.def("matvec", &matvec, "x (k, n) . decoded(codes)^T as fp32 (k, m), k <= 8", py::arg("x"),
        py::arg("codes"), py::arg("abs_table"), py::arg("mode"), py::arg("table2"),
        py::arg("resid_scale"), py::arg("early_successor"), py::arg("stream"));
  harp_transforms::register_functions(m);
}
