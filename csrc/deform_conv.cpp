// Schema of the dcnlab deformable convolution ops and the argument checks every backend runs.
#include "deform_conv.h"

#include <Python.h>
#include <torch/library.h>

#include <sstream>

namespace dcnlab {
namespace {

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream out;
  out << shape;
  return out.str();
}

void check_same_dtype_and_device(const at::Tensor& input, const at::Tensor& other, const char* name) {
  TORCH_CHECK_VALUE(other.scalar_type() == input.scalar_type(), name, ": expected dtype ", input.scalar_type(),
                    " (the dtype of input), got ", other.scalar_type());
  TORCH_CHECK_VALUE(other.device() == input.device(), name, ": expected device ", input.device(),
                    " (the device of input), got ", other.device());
}

void check_conv_param(at::IntArrayRef values, int64_t dims, const char* name, int64_t minimum) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(values.size()) == dims, name, ": expected ", dims,
                    " values (one per spatial dim), got ", values.size());
  // The upper bound keeps the output-size arithmetic far from int64 overflow.
  constexpr int64_t maximum = int64_t(1) << 31;
  for (const auto v : values) {
    TORCH_CHECK_VALUE(v >= minimum && v < maximum, name, ": expected every value in [", minimum, ", 2^31), got ",
                      shape_str(values));
  }
}

void check_per_output_tensor(const at::Tensor& t, const char* name, int64_t batch, int64_t channels,
                             const std::vector<int64_t>& out_size, const char* channel_rule) {
  std::vector<int64_t> expected{batch, channels};
  expected.insert(expected.end(), out_size.begin(), out_size.end());
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), name, ": expected shape ", shape_str(expected),
                    " (", channel_rule, "), got ", shape_str(t.sizes()));
}

}  // namespace

void check_deform_conv_args(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, const std::optional<at::Tensor>& mask) {
  const int64_t dims = input.dim() - 2;
  TORCH_CHECK_VALUE(dims >= 1 && dims <= 3, "input: expected a 3-D, 4-D or 5-D tensor (B, C_in, *spatial), got shape ",
                    shape_str(input.sizes()));
  const auto dtype = input.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                    "input: expected dtype float32, float64, float16 or bfloat16, got ", dtype);
  check_same_dtype_and_device(input, offset, "offset");
  check_same_dtype_and_device(input, weight, "weight");
  if (bias) check_same_dtype_and_device(input, *bias, "bias");
  if (mask) check_same_dtype_and_device(input, *mask, "mask");

  for (int64_t a = 0; a < dims; ++a) {
    TORCH_CHECK_VALUE(input.size(a + 2) > 0, "input: expected non-empty spatial dims, got shape ",
                      shape_str(input.sizes()));
  }
  TORCH_CHECK_VALUE(weight.dim() == input.dim(), "weight: expected a ", input.dim(),
                    "-D tensor (C_out, C_in/groups, *kernel), got shape ", shape_str(weight.sizes()));
  const int64_t in_channels = input.size(1);
  const int64_t out_channels = weight.size(0);
  const int64_t group_channels = weight.size(1);
  TORCH_CHECK_VALUE(in_channels > 0, "input: expected at least one channel, got shape ", shape_str(input.sizes()));
  TORCH_CHECK_VALUE(out_channels > 0 && group_channels > 0,
                    "weight: expected positive C_out and C_in/groups, got shape ", shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(in_channels % group_channels == 0, "weight: C_in/groups = ", group_channels,
                    " must divide input channels C_in = ", in_channels);
  const int64_t groups = in_channels / group_channels;
  TORCH_CHECK_VALUE(out_channels % groups == 0, "weight: C_out = ", out_channels,
                    " must be divisible by groups = ", groups, " (C_in / weight.shape[1])");
  int64_t kernel_points = 1;
  for (int64_t a = 0; a < dims; ++a) {
    TORCH_CHECK_VALUE(weight.size(a + 2) > 0 && weight.size(a + 2) < (int64_t(1) << 31),
                      "weight: expected kernel sizes in [1, 2^31), got shape ", shape_str(weight.sizes()));
    kernel_points *= weight.size(a + 2);
  }

  check_conv_param(stride, dims, "stride", 1);
  check_conv_param(padding, dims, "padding", 0);
  check_conv_param(dilation, dims, "dilation", 1);

  std::vector<int64_t> out_size(dims);
  for (int64_t a = 0; a < dims; ++a) {
    const int64_t span = dilation[a] * (weight.size(a + 2) - 1) + 1;
    out_size[a] = (input.size(a + 2) + 2 * padding[a] - span) / stride[a] + 1;
    TORCH_CHECK_VALUE(input.size(a + 2) + 2 * padding[a] >= span,
                      "input: output would be empty: spatial dim ", a, " of size ", input.size(a + 2),
                      " with padding ", padding[a], " is smaller than the dilated kernel extent ", span);
  }

  TORCH_CHECK_VALUE(offset.dim() == input.dim(), "offset: expected a ", input.dim(),
                    "-D tensor (B, offset_groups*K*", dims, ", *out_spatial), got shape ",
                    shape_str(offset.sizes()));
  const int64_t per_group = kernel_points * dims;
  TORCH_CHECK_VALUE(offset.size(1) > 0 && offset.size(1) % per_group == 0, "offset: expected channels a positive multiple of K*",
                    dims, " = ", per_group, " (offset_groups * kernel points * spatial dims), got ", offset.size(1));
  const int64_t offset_groups = offset.size(1) / per_group;
  TORCH_CHECK_VALUE(in_channels % offset_groups == 0, "offset: offset_groups = ", offset_groups,
                    " (offset channels / ", per_group, ") must divide input channels C_in = ", in_channels);
  check_per_output_tensor(offset, "offset", input.size(0), offset.size(1), out_size,
                          "B, offset_groups*K*dims, *out_spatial");
  if (mask) {
    TORCH_CHECK_VALUE(mask->dim() == input.dim(), "mask: expected a ", input.dim(),
                      "-D tensor (B, offset_groups*K, *out_spatial), got shape ", shape_str(mask->sizes()));
    check_per_output_tensor(*mask, "mask", input.size(0), offset_groups * kernel_points, out_size,
                            "B, offset_groups*K, *out_spatial");
  }
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_channels, "bias: expected shape [", out_channels,
                      "] (C_out), got ", shape_str(bias->sizes()));
  }
}

void check_deform_conv_backward_args(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& mask,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_deform_conv_args(input, offset, weight, std::nullopt, stride, padding, dilation, mask);
  check_same_dtype_and_device(input, grad_output, "grad_output");
  std::vector<int64_t> out_size;
  for (int64_t a = 2; a < offset.dim(); ++a) out_size.push_back(offset.size(a));
  check_per_output_tensor(grad_output, "grad_output", input.size(0), weight.size(0), out_size,
                          "B, C_out, *out_spatial");
}

}  // namespace dcnlab

TORCH_LIBRARY(dcnlab, m) {
  m.def(
      "deform_conv(Tensor input, Tensor offset, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "int[] dilation, Tensor? mask) -> Tensor");
  // output_mask selects the gradients to compute, in the order of the results: input, offset,
  // weight, bias, mask. Gradients not asked for come back as empty tensors.
  m.def(
      "deform_conv_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
      "int[] stride, int[] padding, int[] dilation, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// A module init so that `import dcnlab._C` loads the library (and runs the registrations).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
