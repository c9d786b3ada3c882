// Host-side pieces shared by every backend of the dcnlab::deform_conv op: argument checking
// and the conversion of checked arguments into a ConvGeometry.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "sampling.h"

namespace dcnlab {

// Every argument check of the op, with messages that name the argument and say what was
// expected and what was given. Throws ValueError (TORCH_CHECK_VALUE) on bad input.
void check_deform_conv_args(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, const std::optional<at::Tensor>& mask);

// The checks of the forward plus that of grad_output.
void check_deform_conv_backward_args(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& mask,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

// Geometry of checked arguments; D must equal input.dim() - 2.
template <int D>
ConvGeometry<D> make_geometry(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  ConvGeometry<D> geo;
  geo.batch = input.size(0);
  geo.in_channels = input.size(1);
  geo.out_channels = weight.size(0);
  geo.groups = input.size(1) / weight.size(1);
  geo.in_plane = 1;
  geo.out_plane = 1;
  geo.kernel_points = 1;
  for (int a = 0; a < D; ++a) {
    geo.in_size[a] = input.size(a + 2);
    geo.kernel[a] = weight.size(a + 2);
    geo.stride[a] = stride[a];
    geo.padding[a] = padding[a];
    geo.dilation[a] = dilation[a];
    geo.out_size[a] = (geo.in_size[a] + 2 * geo.padding[a] - geo.dilation[a] * (geo.kernel[a] - 1) - 1) / geo.stride[a] + 1;
    geo.in_plane *= geo.in_size[a];
    geo.out_plane *= geo.out_size[a];
    geo.kernel_points *= geo.kernel[a];
  }
  geo.offset_groups = offset.size(1) / (geo.kernel_points * D);
  return geo;
}

// Calls fn(std::integral_constant<int, D>{}) for D = dims, which must be 1, 2 or 3.
template <typename Fn>
decltype(auto) dispatch_spatial_dims(int64_t dims, Fn&& fn) {
  switch (dims) {
    case 1:
      return fn(std::integral_constant<int, 1>{});
    case 2:
      return fn(std::integral_constant<int, 2>{});
    case 3:
      return fn(std::integral_constant<int, 3>{});
    default:
      TORCH_CHECK_VALUE(false, "input: expected 1 to 3 spatial dims, got ", dims);
  }
}

// The output of the backward op for gradients nobody asked for.
inline at::Tensor not_requested(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace dcnlab
