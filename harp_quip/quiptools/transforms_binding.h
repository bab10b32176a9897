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
int harp_hadamard(const void* x, int x_half, void* y, int y_half, int rows, int n, int k,
                  const float* base, float scale, const float* scale_in,
                  const float* scale_out, void* stream);
int harp_rotation_group(const void* x, int x_half, void* y, int y_half, int rows, int n,
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

inline int half_flag(const torch::Tensor& t) { return t.scalar_type() == torch::kFloat16 ? 1 : 0; }

inline torch::Tensor empty_output(const torch::Tensor& x, bool out_half) {
  return torch::empty(x.sizes(), x.options().dtype(out_half ? torch::kFloat16 : torch::kFloat32));
}

// scale_out * (base (x) H_p) (scale * (scale_in * x)) on the rows of x (n = k p; base the
// k x k float32 base matrix, none for k = 1), float32 out (float16 when out_half).
inline torch::Tensor hadamard(torch::Tensor x, int64_t k, OptionalTensor base, double scale,
                              OptionalTensor scale_in, OptionalTensor scale_out, bool out_half,
                              int64_t stream) {
  check_rows(x);
  const int64_t p = k >= 1 ? x.size(1) / k : 0;
  TORCH_CHECK(k >= 1 && p * k == x.size(1) && (p & (p - 1)) == 0 && x.size(1) <= 32768,
              "transforms: hadamard needs n = k p <= 32768 with p a power of two, got n = ",
              text(x.size(1)), ", k = ", text(k));
  TORCH_CHECK(base.has_value() == (k > 1),
              "transforms: hadamard takes a base matrix exactly when k > 1 (k = ", text(k), ")");
  const float* base_ptr = nullptr;
  if (base.has_value()) {
    check_on(*base, x, "base");
    TORCH_CHECK(base->scalar_type() == torch::kFloat32 && base->dim() == 2 &&
                    base->size(0) == k && base->size(1) == k,
                "transforms: base must be float32 (k, k) with k = ", text(k), ", got ",
                text(base->sizes()), " ", base->scalar_type());
    base_ptr = base->data_ptr<float>();
  }
  auto y = empty_output(x, out_half);
  check_launch(harp_hadamard(x.data_ptr(), half_flag(x), y.data_ptr(), out_half ? 1 : 0,
                             static_cast<int>(x.size(0)), static_cast<int>(x.size(1)),
                             static_cast<int>(k), base_ptr, static_cast<float>(scale),
                             optional_scale(scale_in, x, "scale_in"),
                             optional_scale(scale_out, x, "scale_out"), as_stream(stream)),
               "hadamard");
  return y;
}

// The stages (blocks[t] (n / radix[t], radix[t], radix[t]) float32, stride[t]) of one
// rotation group applied to the rows of x, in the given order (float32 out, float16 when
// out_half).
inline torch::Tensor rotation_group(torch::Tensor x, std::vector<torch::Tensor> blocks,
                                    std::vector<int64_t> radix, std::vector<int64_t> stride,
                                    bool transpose, OptionalTensor scale_in,
                                    OptionalTensor scale_out, bool out_half, int64_t stream) {
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
  auto y = empty_output(x, out_half);
  check_launch(harp_rotation_group(
                   x.data_ptr(), half_flag(x), y.data_ptr(), out_half ? 1 : 0,
                   static_cast<int>(x.size(0)), static_cast<int>(x.size(1)), block_ptrs.data(),
                   radix32.data(), stride32.data(), static_cast<int>(blocks.size()),
                   transpose ? 1 : 0, optional_scale(scale_in, x, "scale_in"),
                   optional_scale(scale_out, x, "scale_out"), as_stream(stream)),
               "rotation_group");
  return y;
}

inline void register_functions(pybind11::module& m) {
  m.def("hadamard", &hadamard,
        "scale_out * (base (x) H_p) (scale * (scale_in * x)) on the rows (float32 or float16 out)",
        pybind11::arg("x"), pybind11::arg("k"), pybind11::arg("base"), pybind11::arg("scale"),
        pybind11::arg("scale_in"), pybind11::arg("scale_out"), pybind11::arg("out_half"),
        pybind11::arg("stream"));
  m.def("rotation_group", &rotation_group,
        "consecutive-digit stages of a structured rotation on the rows (float32 or float16 out)",
        pybind11::arg("x"), pybind11::arg("blocks"), pybind11::arg("radix"),
        pybind11::arg("stride"), pybind11::arg("transpose"), pybind11::arg("scale_in"),
        pybind11::arg("scale_out"), pybind11::arg("out_half"), pybind11::arg("stream"));
}

}  // namespace harp_transforms
