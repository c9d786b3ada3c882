// The backend-independent half of the op: batch chunking, the GEMMs and the reductions.
//
// The deformable sampling is the only backend-specific part. A backend supplies a Sampler
// with three kernels over a chunk of n samples starting at sample b0:
//   sample_columns<D>(geo, input, offset, mask, b0, n, columns)
//       columns[(c*K + k), b, l] = mask * interpolate(input[b0 + b, c], p(k, l))
//   position_grads<D>(geo, input, offset, mask, b0, n, grad_columns, grad_offset, grad_mask)
//       writes grad_offset and grad_mask of those samples (either may be null: not wanted)
//   input_grads<D>(geo, offset, mask, b0, n, grad_columns, grad_input)
//       accumulates into grad_input, a zeroed chunk-local (n, C_in, *in_spatial) buffer
// plus `column_t<scalar_t>`, the dtype of sampled columns, and column_budget(), the number of
// column elements a chunk may hold. Gradient columns and grad_input are always in opmath
// (fp32 for half types).
//
// Columns are laid out (C_in*K, n, L) so that one batched GEMM over the conv groups covers the
// whole chunk: output (G, C_out/G, n*L) = weight (G, C_out/G, C_in/G*K) @ columns.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <array>
#include <tuple>

#include "deform_conv.h"

namespace dcnlab {

namespace driver_detail {

// a @ b in dtype `out`; products of half types accumulate in fp32 inside the GEMM.
inline at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, at::ScalarType out) {
  return a.scalar_type() == out ? at::bmm(a, b) : at::bmm(a, b, out);
}

// acc += a @ b, where acc may have a wider dtype than a and b.
inline void gemm_accumulate(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == acc.scalar_type()) {
    acc.baddbmm_(a, b);
  } else {
    acc = at::baddbmm(acc, a, b, acc.scalar_type());
  }
}

// Samples per chunk: as many as fit the column budget, spread evenly over the chunks.
template <int D>
int64_t chunk_samples(const ConvGeometry<D>& geo, int64_t column_budget) {
  const int64_t per_sample = geo.in_channels * geo.kernel_points * geo.out_plane;
  const int64_t fit = std::max<int64_t>(1, std::min<int64_t>(geo.batch, column_budget / std::max<int64_t>(per_sample, 1)));
  const int64_t chunks = (geo.batch + fit - 1) / fit;
  return (geo.batch + chunks - 1) / chunks;
}

template <int D>
std::vector<int64_t> output_shape(const ConvGeometry<D>& geo) {
  std::vector<int64_t> shape{geo.batch, geo.out_channels};
  shape.insert(shape.end(), geo.out_size, geo.out_size + D);
  return shape;
}

}  // namespace driver_detail

template <typename Sampler>
at::Tensor deform_conv_forward(const at::Tensor& input_arg, const at::Tensor& offset_arg, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, const std::optional<at::Tensor>& mask_arg) {
  using namespace driver_detail;
  check_deform_conv_args(input_arg, offset_arg, weight, bias, stride, padding, dilation, mask_arg);
  return dispatch_spatial_dims(input_arg.dim() - 2, [&](auto dims) {
    constexpr int D = decltype(dims)::value;
    const auto geo = make_geometry<D>(input_arg, offset_arg, weight, stride, padding, dilation);
    auto output = at::empty(output_shape(geo), input_arg.options());
    if (geo.batch == 0) return output;
    const auto input = input_arg.contiguous();
    const auto offset = offset_arg.contiguous();
    const auto mask = mask_arg ? std::optional<at::Tensor>(mask_arg->contiguous()) : std::nullopt;
    const int64_t groups = geo.groups;
    const int64_t out_per_group = geo.out_channels / groups;
    const int64_t rows_per_group = geo.in_channels / groups * geo.kernel_points;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnlab::deform_conv", [&] {
      using column_t = typename Sampler::template column_t<scalar_t>;
      const auto column_dtype = c10::CppTypeToScalarType<column_t>::value;
      const auto w = weight.to(column_dtype).reshape({groups, out_per_group, rows_per_group});
      const auto b = bias ? std::optional<at::Tensor>(bias->to(column_dtype).view({groups, out_per_group, 1}))
                          : std::nullopt;
      const int64_t chunk = chunk_samples(geo, Sampler::column_budget());
      auto columns = at::empty({geo.in_channels * geo.kernel_points * chunk * geo.out_plane},
                               input.options().dtype(column_dtype));
      for (int64_t b0 = 0; b0 < geo.batch; b0 += chunk) {
        const int64_t n = std::min(chunk, geo.batch - b0);
        const auto cols = columns.narrow(0, 0, rows_per_group * groups * n * geo.out_plane)
                              .view({groups, rows_per_group, n * geo.out_plane});
        Sampler::template sample_columns<D>(geo, input.template const_data_ptr<scalar_t>(), offset.template const_data_ptr<scalar_t>(),
                                            mask ? mask->template const_data_ptr<scalar_t>() : nullptr, b0, n,
                                            cols.template mutable_data_ptr<column_t>());
        const auto result = b ? at::baddbmm(b->expand({groups, out_per_group, n * geo.out_plane}), w, cols)
                              : at::bmm(w, cols);
        output.narrow(0, b0, n)
            .view({n, groups, out_per_group, geo.out_plane})
            .copy_(result.view({groups, out_per_group, n, geo.out_plane}).permute({2, 0, 1, 3}));
      }
    });
    return output;
  });
}

template <typename Sampler>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward(
    const at::Tensor& grad_output_arg, const at::Tensor& input_arg, const at::Tensor& offset_arg,
    const at::Tensor& weight, const std::optional<at::Tensor>& mask_arg, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 5> output_mask) {
  using namespace driver_detail;
  check_deform_conv_backward_args(grad_output_arg, input_arg, offset_arg, weight, mask_arg, stride, padding, dilation);
  const bool need_input = output_mask[0];
  const bool need_offset = output_mask[1];
  const bool need_weight = output_mask[2];
  const bool need_bias = output_mask[3];
  const bool need_mask = output_mask[4] && mask_arg.has_value();
  return dispatch_spatial_dims(input_arg.dim() - 2, [&](auto dims) {
    constexpr int D = decltype(dims)::value;
    const auto geo = make_geometry<D>(input_arg, offset_arg, weight, stride, padding, dilation);
    const auto input = input_arg.contiguous();
    const auto offset = offset_arg.contiguous();
    const auto mask = mask_arg ? std::optional<at::Tensor>(mask_arg->contiguous()) : std::nullopt;
    const auto grad_output = grad_output_arg.contiguous();
    const auto opmath_dtype = at::toOpMathType(input.scalar_type());

    auto grad_input = need_input ? at::zeros_like(input) : not_requested(input);
    auto grad_offset = need_offset ? at::zeros_like(offset) : not_requested(input);
    auto grad_mask = need_mask ? at::zeros_like(*mask) : not_requested(input);
    auto grad_bias = not_requested(input);
    if (need_bias) {
      std::vector<int64_t> reduced_dims{0};
      for (int a = 0; a < D; ++a) reduced_dims.push_back(a + 2);
      grad_bias = at::sum(grad_output, reduced_dims, false, opmath_dtype).to(input.scalar_type());
    }

    const int64_t groups = geo.groups;
    const int64_t out_per_group = geo.out_channels / groups;
    const int64_t rows_per_group = geo.in_channels / groups * geo.kernel_points;
    auto grad_weight_acc = need_weight ? at::zeros({groups, out_per_group, rows_per_group}, input.options().dtype(opmath_dtype))
                                       : at::Tensor();
    const bool need_sampling_grads = need_input || need_offset || need_mask;
    if (geo.batch > 0 && (need_weight || need_sampling_grads)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnlab::deform_conv_backward", [&] {
        using column_t = typename Sampler::template column_t<scalar_t>;
        using opmath_t = at::opmath_type<scalar_t>;
        const auto column_dtype = c10::CppTypeToScalarType<column_t>::value;
        const auto w = weight.to(column_dtype).reshape({groups, out_per_group, rows_per_group});
        const auto w_t = w.transpose(1, 2);
        const scalar_t* mask_ptr = mask ? mask->template const_data_ptr<scalar_t>() : nullptr;
        const int64_t chunk = chunk_samples(geo, Sampler::column_budget());
        auto columns = need_weight ? at::empty({rows_per_group * groups * chunk * geo.out_plane},
                                               input.options().dtype(column_dtype))
                                   : at::Tensor();
        // Half-type input gradients accumulate in an fp32 buffer, one chunk at a time.
        const bool input_grad_in_place = input.scalar_type() == opmath_dtype;
        auto grad_input_acc = need_input && !input_grad_in_place
                                  ? at::empty({chunk, geo.in_channels, geo.in_plane}, input.options().dtype(opmath_dtype))
                                  : at::Tensor();
        for (int64_t b0 = 0; b0 < geo.batch; b0 += chunk) {
          const int64_t n = std::min(chunk, geo.batch - b0);
          const auto grad_out_cols = grad_output.narrow(0, b0, n)
                                         .view({n, groups, out_per_group, geo.out_plane})
                                         .permute({1, 2, 0, 3})
                                         .to(column_dtype)
                                         .reshape({groups, out_per_group, n * geo.out_plane});
          if (need_weight) {
            const auto cols = columns.narrow(0, 0, rows_per_group * groups * n * geo.out_plane)
                                  .view({groups, rows_per_group, n * geo.out_plane});
            Sampler::template sample_columns<D>(geo, input.template const_data_ptr<scalar_t>(), offset.template const_data_ptr<scalar_t>(),
                                                mask_ptr, b0, n, cols.template mutable_data_ptr<column_t>());
            gemm_accumulate(grad_weight_acc, grad_out_cols, cols.transpose(1, 2));
          }
          if (!need_sampling_grads) continue;
          const auto grad_cols = gemm(w_t, grad_out_cols, opmath_dtype).contiguous();
          if (need_offset || need_mask) {
            Sampler::template position_grads<D>(geo, input.template const_data_ptr<scalar_t>(), offset.template const_data_ptr<scalar_t>(),
                                                mask_ptr, b0, n, grad_cols.template const_data_ptr<opmath_t>(),
                                                need_offset ? grad_offset.template mutable_data_ptr<scalar_t>() : nullptr,
                                                need_mask ? grad_mask.template mutable_data_ptr<scalar_t>() : nullptr);
          }
          if (need_input) {
            auto target = input_grad_in_place ? grad_input.narrow(0, b0, n)
                                              : grad_input_acc.narrow(0, 0, n).zero_();
            Sampler::template input_grads<D>(geo, offset.template const_data_ptr<scalar_t>(), mask_ptr, b0, n,
                                             grad_cols.template const_data_ptr<opmath_t>(), target.template mutable_data_ptr<opmath_t>());
            if (!input_grad_in_place) {
              grad_input.narrow(0, b0, n).copy_(target.view_as(grad_input.narrow(0, b0, n)));
            }
          }
        }
      });
    }
    auto grad_weight = need_weight ? grad_weight_acc.view(weight.sizes()).to(weight.scalar_type())
                                   : not_requested(input);
    return std::make_tuple(grad_input, grad_offset, grad_weight, grad_bias, grad_mask);
  });
}

}  // namespace dcnlab
