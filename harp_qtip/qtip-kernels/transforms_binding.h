// PyTorch binding of the HARP transform launchers (transforms.cu), shared by both
// backends: harp_quip/quiptools/transforms_binding.h is the source of truth and
// harp_qtip/qtip-kernels/transforms_binding.h a byte copy (harp_qtip/tests/test_mirror.py).
// A backend's binding file includes it and calls harp_transforms::register_functions(m)
// in its PYBIND11_MODULE. No CUDA headers: the caller passes the CUDA stream as an integer.
#pragma once

#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

extern "C" {
const char* harp_transforms_error_string(int error);
int harp_fwht(const void* x, int x_half, float* y, int rows, int n, int p, float scale,
              const float* scale_in, const float* scale_out, void* stream);
int harp_rotation_group(const void* x, int x_half, float* y, int rows, int n,
                        const float* const* blocks, const int* radix, const int* stride,
                        int count, int transpose, const float* scale_in,
                        const float* scale_out, void* stream);
}

namespace harp_transforms {

using OptionalTensor = std::optional<torch::Tensor>;

// Numbers and shapes for TORCH_CHECK messages, formatted by std::to_string: streaming an
// integer into the message crashed (SIGSEGV in std::ostream::_M_insert<long>) in the
// JIT-built extensions on the device (torch 2.11, CUDA 13, H200), so no message streams one.
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline std::string text(T value) {
  return std::to_string(value);
}

inline std::string text(c10::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + ")";
}

inline void check_launch(int error, const char* what) {
  TORCH_CHECK(error == 0, "transforms.", what, " failed: ", harp_transforms_error_string(error));
}

inline void check_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2,
              "transforms: x must be a contiguous 2-D CUDA tensor (rows, n), got ",
              text(x.sizes()));
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat16,
              "transforms: x must be float32 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) <= 65535 && x.size(1) <= INT32_MAX / 2,
              "transforms: x too large for the transform kernels: ", text(x.sizes()));
}

inline void check_on(const torch::Tensor& t, const torch::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device() && t.is_contiguous(), "transforms: ",
              name, " must be a contiguous CUDA tensor on ", x.device());
}

inline const float* optional_scale(const OptionalTensor& scale, const torch::Tensor& x,
                                   const char* name) {
  if (!scale.has_value()) return nullptr;
  check_on(*scale, x, name);
  TORCH_CHECK(scale->scalar_type() == torch::kFloat32 && scale->numel() == x.size(1),
              "transforms: ", name, " must hold ", text(x.size(1)), " float32 values");
  return scale->data_ptr<float>();
}

inline void* as_stream(int64_t stream) {
  return reinterpret_cast<void*>(static_cast<intptr_t>(stream));
}

// scale * x H_p on every length-p segment of the rows of x (float32 out), with optional
// per-column factors before (scale_in) and after (scale_out).
inline torch::Tensor fwht(torch::Tensor x, int64_t p, double scale, OptionalTensor scale_in,
                          OptionalTensor scale_out, int64_t stream) {
  check_rows(x);
  auto y = torch::empty(x.sizes(), x.options().dtype(torch::kFloat32));
  check_launch(harp_fwht(x.data_ptr(), x.scalar_type() == torch::kFloat16 ? 1 : 0,
                         y.data_ptr<float>(), static_cast<int>(x.size(0)),
                         static_cast<int>(x.size(1)), static_cast<int>(p),
                         static_cast<float>(scale), optional_scale(scale_in, x, "scale_in"),
                         optional_scale(scale_out, x, "scale_out"), as_stream(stream)),
               "fwht");
  return y;
}

// The stages (blocks[t] (n / radix[t], radix[t], radix[t]) float32, stride[t]) of one
// rotation group applied to the rows of x, in the given order (float32 out).
inline torch::Tensor rotation_group(torch::Tensor x, std::vector<torch::Tensor> blocks,
                                    std::vector<int64_t> radix, std::vector<int64_t> stride,
                                    bool transpose, OptionalTensor scale_in,
                                    OptionalTensor scale_out, int64_t stream) {
  check_rows(x);
  TORCH_CHECK(!blocks.empty() && blocks.size() == radix.size() && blocks.size() == stride.size(),
              "transforms: blocks, radix and stride must have the same non-zero length");
  std::vector<const float*> block_ptrs;
  std::vector<int> radix32, stride32;
  for (size_t t = 0; t < blocks.size(); ++t) {
    check_on(blocks[t], x, "blocks");
    TORCH_CHECK(blocks[t].scalar_type() == torch::kFloat32 && blocks[t].dim() == 3 &&
                    blocks[t].size(1) == radix[t] && blocks[t].size(2) == radix[t] &&
                    blocks[t].size(0) * radix[t] == x.size(1),
                "transforms: stage ", text(t), " blocks must be float32 (n / b, b, b) with b = ",
                text(radix[t]), ", got ", text(blocks[t].sizes()), " ", blocks[t].scalar_type());
    block_ptrs.push_back(blocks[t].data_ptr<float>());
    radix32.push_back(static_cast<int>(radix[t]));
    stride32.push_back(static_cast<int>(stride[t]));
  }
  auto y = torch::empty(x.sizes(), x.options().dtype(torch::kFloat32));
  check_launch(harp_rotation_group(
                   x.data_ptr(), x.scalar_type() == torch::kFloat16 ? 1 : 0, y.data_ptr<float>(),
                   static_cast<int>(x.size(0)), static_cast<int>(x.size(1)), block_ptrs.data(),
                   radix32.data(), stride32.data(), static_cast<int>(blocks.size()),
                   transpose ? 1 : 0, optional_scale(scale_in, x, "scale_in"),
                   optional_scale(scale_out, x, "scale_out"), as_stream(stream)),
               "rotation_group");
  return y;
}

inline void register_functions(pybind11::module& m) {
  m.def("fwht", &fwht, "scale * x H_p per length-p segment of the rows (float32 out)",
        pybind11::arg("x"), pybind11::arg("p"), pybind11::arg("scale"),
        pybind11::arg("scale_in"), pybind11::arg("scale_out"), pybind11::arg("stream"));
  m.def("rotation_group", &rotation_group,
        "consecutive-digit stages of a structured rotation on the rows (float32 out)",
        pybind11::arg("x"), pybind11::arg("blocks"), pybind11::arg("radix"),
        pybind11::arg("stride"), pybind11::arg("transpose"), pybind11::arg("scale_in"),
        pybind11::arg("scale_out"), pybind11::arg("stream"));
}

}  // namespace harp_transforms
