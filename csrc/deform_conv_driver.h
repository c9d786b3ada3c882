// The backend-independent half of the op: batch chunking, the GEMMs and the reductions.
//
// The deformable sampling is the only backend-specific part. A backend supplies a Sampler with
// two kernels over a chunk of n samples starting at sample b0:
//   sample_columns<D>(geo, input, offset, mask, b0, n, columns)
//       the sampled, modulated input values of every (sample point, channel)
//   sampling_grads<D>(geo, input, offset, mask, b0, n, grad_columns, grad_offset, grad_mask, grad_input,
//                     columns)
//       writes grad_offset and grad_mask of those samples, accumulates grad_input (a zeroed,
//       chunk-local buffer) and writes the columns as sample_columns does (a backend may fuse
//       that with the gradients); any of the four may be null: not wanted
// and forward_fused<D, scalar_t>(geo, input, offset, mask, weight_rows, bias, output), which may
// compute the whole forward without columns and return true, or return false to use the columns
// (its input is the op's input in the caller's layout, not the Layout's copy);
// likewise backward_fused<D, scalar_t>(geo, input, offset, mask, weight_rows, grad_output, need,
// grad_input, grad_offset, grad_mask, grad_weight_rows, grad_bias) for the backward (need: input,
// offset, mask, weight, bias; it fills the wanted results, grad_weight_rows as (G, C_out/G, R) in
// opmath, and may fill grad_bias, which bias_grad computes where it stays undefined; its input
// likewise the op's);
// plus bias_grad(grad_output), the sum of a contiguous (B, C_out, *out) grad output over all but
// its channel dim in its dtype (accumulated in opmath, deterministic),
// `column_t<scalar_t>`, the dtype of sampled columns, `grad_column_t<scalar_t>`, the dtype of
// gradient columns (the GEMM rounds its opmath accumulators to it), column_budget(), the number of
// column elements a chunk may hold, and kChannelsLast, which picks one of two layouts (a
// channels-last backend also supplies to_channels_last(input), the (B, *in, C_in) copy of an input,
// from_channels_last(target, buffer), which writes (n, *in, C_in) as (n, C_in, *in) with a cast,
// transpose(src, dst, batch, rows, cols), dst (batch, cols, rows) <- src (batch, rows, cols) with
// a cast (false: not done), and swap_rows(src, dst, I, J, run, bias), dst (J, I, run) <- src (I, J, run)
// (+ bias[i] where bias, a contiguous tensor of I elements of their dtype, is not null)):
//
//   kChannelsLast = false: input (B, C_in, *in); columns (G, R, n*L) with row r = c*K + k, the
//       weight's own order; grad_input buffer (n, C_in, *in).
//   kChannelsLast = true: input (B, *in, C_in); columns (G, n*L, R) with r = k*C_in/G + c, so the
//       channels of one sample point are contiguous; grad_input buffer (n, *in, C_in).
//
// G is the number of conv groups and R = C_in/G * K. Either way the columns of one group form a
// matrix that one batched GEMM multiplies for the whole chunk:
//   output (G, C_out/G, n*L) = weight rows (G, C_out/G, R) @ columns (G, R, n*L).
// grad_input is always accumulated in opmath (fp32 for half types).
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

// Samples per chunk of a batch when each sample needs per_sample elements of a buffer of at most
// `budget`: as many as fit (at least one), spread evenly over the chunks.
inline int64_t even_chunk(int64_t batch, int64_t per_sample, int64_t budget) {
  const int64_t fit = std::max<int64_t>(1, std::min<int64_t>(batch, budget / std::max<int64_t>(per_sample, 1)));
  const int64_t chunks = (batch + fit - 1) / fit;
  return (batch + chunks - 1) / chunks;
}

// Samples per chunk of the column buffer.
template <int D>
int64_t chunk_samples(const ConvGeometry<D>& geo, int64_t column_budget) {
  return even_chunk(geo.batch, geo.in_channels * geo.kernel_points * geo.out_plane, column_budget);
}

template <int D>
std::vector<int64_t> output_shape(const ConvGeometry<D>& geo) {
  std::vector<int64_t> shape{geo.batch, geo.out_channels};
  shape.insert(shape.end(), geo.out_size, geo.out_size + D);
  return shape;
}

// Matrix shapes of one chunk and the layout conversions that depend on Sampler::kChannelsLast.
template <int D, typename Sampler>
struct Layout {
  static constexpr bool channels_last = Sampler::kChannelsLast;
  int64_t groups, out_per_group, in_per_group, kernel_points, rows_per_group;

  explicit Layout(const ConvGeometry<D>& geo)
      : groups(geo.groups),
        out_per_group(geo.out_channels / geo.groups),
        in_per_group(geo.in_channels / geo.groups),
        kernel_points(geo.kernel_points),
        rows_per_group(geo.in_channels / geo.groups * geo.kernel_points) {}

  at::Tensor input(const at::Tensor& input) const {
    if constexpr (channels_last) {
      return Sampler::to_channels_last(input);
    } else {
      return input.contiguous();
    }
  }

  // (C_out, C_in/G, *kernel) -> (G, C_out/G, R) in the row order of the columns.
  at::Tensor weight_rows(const at::Tensor& weight, at::ScalarType dtype) const {
    const auto w = weight.to(dtype);
    if (!channels_last) return w.reshape({groups, out_per_group, rows_per_group});
    if constexpr (channels_last) {
      auto rows = at::empty({groups, out_per_group, rows_per_group}, w.options());
      if (Sampler::transpose(w.contiguous(), rows, groups * out_per_group, in_per_group, kernel_points)) return rows;
    }
    return w.reshape({groups, out_per_group, in_per_group, kernel_points}).transpose(2, 3).reshape(
        {groups, out_per_group, rows_per_group});
  }

  // The weight gradient from its contiguous (G, C_out/G, R) rows, in the weight's shape and dtype:
  // one copy that reorders and casts together.
  at::Tensor weight_from_rows(const at::Tensor& rows, const at::Tensor& weight) const {
    if (!channels_last) return rows.reshape(weight.sizes()).to(weight.scalar_type());
    auto result = at::empty({groups, out_per_group, in_per_group, kernel_points}, weight.options());
    if constexpr (channels_last) {
      const int64_t out_channels = groups * out_per_group;
      if (rows.is_contiguous() && Sampler::transpose(rows, result, out_channels, kernel_points, in_per_group)) {
        return result.view(weight.sizes());
      }
    }
    result.copy_(rows.view({groups, out_per_group, kernel_points, in_per_group}).transpose(2, 3));
    return result.view(weight.sizes());
  }

  // Writes the chunk's output, weight rows (G, C_out/G, R) @ columns (G, R, n*L) plus the bias
  // (null: none; (C_out) in the columns' dtype), into samples [b0, b0 + n) of the contiguous output
  // (B, C_out, *out). Channels-last: the bias is added while swap_rows permutes the GEMM result
  // (a baddbmm would first copy the broadcast bias into its result); else inside the GEMM.
  void store_product(at::Tensor& output, int64_t b0, int64_t n, int64_t out_plane, const at::Tensor& w,
                     const at::Tensor& columns, const at::Tensor* bias) const {
    auto target = output.narrow(0, b0, n);
    if constexpr (channels_last) {
      Sampler::swap_rows(at::bmm(w, columns), target, groups * out_per_group, n, out_plane, bias);
    } else {
      // (A braced list straight inside expand(...) is mistranslated by nvcc's front end.)
      const std::array<int64_t, 3> result_shape{groups, out_per_group, n * out_plane};
      const auto result = bias ? at::baddbmm(bias->view({groups, out_per_group, 1}).expand(result_shape), w, columns)
                               : at::bmm(w, columns);
      target.view({n, groups, out_per_group, out_plane})
          .copy_(result.view({groups, out_per_group, n, out_plane}).permute({2, 0, 1, 3}));
    }
  }

  // Samples [b0, b0 + n) of the contiguous grad output (B, C_out, *out) as the (G, C_out/G, n*L)
  // matrix of the GEMMs, in `dtype`.
  at::Tensor grad_out_rows(const at::Tensor& grad_output, int64_t b0, int64_t n, int64_t out_plane,
                           at::ScalarType dtype) const {
    const auto chunk = grad_output.narrow(0, b0, n);
    if constexpr (channels_last) {
      if (n > 1 && chunk.scalar_type() == dtype) {
        auto rows = at::empty({groups, out_per_group, n * out_plane}, chunk.options());
        Sampler::swap_rows(chunk, rows, n, groups * out_per_group, out_plane);
        return rows;
      }
    }
    return chunk.view({n, groups, out_per_group, out_plane})
        .permute({1, 2, 0, 3})
        .to(dtype)
        .reshape({groups, out_per_group, n * out_plane});
  }

  // (G, R, n*L) view of the first n samples' worth of a column buffer.
  at::Tensor columns(const at::Tensor& storage, int64_t n, int64_t out_plane) const {
    const auto used = storage.narrow(0, 0, groups * rows_per_group * n * out_plane);
    return channels_last ? used.view({groups, n * out_plane, rows_per_group}).transpose(1, 2)
                         : used.view({groups, rows_per_group, n * out_plane});
  }

  // weight_rows^T @ grad_out (G, C_out/G, n*L), in the layout of the columns, contiguous.
  at::Tensor grad_columns(const at::Tensor& w, const at::Tensor& grad_out, at::ScalarType dtype) const {
    return channels_last ? gemm(grad_out.transpose(1, 2), w, dtype) : gemm(w.transpose(1, 2), grad_out, dtype);
  }

  at::Tensor grad_input_buffer(int64_t chunk, const ConvGeometry<D>& geo, const at::TensorOptions& options) const {
    return channels_last ? at::empty({chunk, geo.in_plane, geo.in_channels}, options)
                         : at::empty({chunk, geo.in_channels, geo.in_plane}, options);
  }

  // Copies n samples of a grad_input buffer into grad_input (B, C_in, *in).
  void store_grad_input(at::Tensor& grad_input, int64_t b0, int64_t n, const at::Tensor& buffer) const {
    auto target = grad_input.narrow(0, b0, n);
    if constexpr (channels_last) {
      Sampler::from_channels_last(target, buffer.narrow(0, 0, n));
    } else {
      target.copy_(buffer.narrow(0, 0, n).view(target.sizes()));
    }
  }
};

}  // namespace driver_detail

template <typename Sampler, int D>
at::Tensor deform_conv_forward_dims(const at::Tensor& input_arg, const at::Tensor& offset_arg, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    const std::optional<at::Tensor>& mask_arg) {
  using namespace driver_detail;
  const auto geo = make_geometry<D>(input_arg, offset_arg, weight, stride, padding, dilation);
  auto output = at::empty(output_shape(geo), input_arg.options());
  if (geo.batch == 0) return output;
  const Layout<D, Sampler> layout(geo);
  const auto offset = offset_arg.contiguous();
  const auto mask = mask_arg ? std::optional<at::Tensor>(mask_arg->contiguous()) : std::nullopt;
  const int64_t chunk = chunk_samples(geo, Sampler::column_budget());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_arg.scalar_type(), "dcnlab::deform_conv", [&] {
    using column_t = typename Sampler::template column_t<scalar_t>;
    const auto column_dtype = c10::CppTypeToScalarType<column_t>::value;
    const auto w = layout.weight_rows(weight, column_dtype);
    // A backend may compute the whole forward in one fused kernel for some shapes and dtypes
    // (from the input as given, in the caller's layout).
    if (Sampler::template forward_fused<D, scalar_t>(geo, input_arg, offset, mask, w, bias, output)) return;
    const auto input = layout.input(input_arg);
    const auto b = bias ? bias->to(column_dtype).contiguous() : at::Tensor();
    const auto columns =
        at::empty({geo.in_channels * geo.kernel_points * chunk * geo.out_plane}, input.options().dtype(column_dtype));
    for (int64_t b0 = 0; b0 < geo.batch; b0 += chunk) {
      const int64_t n = std::min(chunk, geo.batch - b0);
      const auto cols = layout.columns(columns, n, geo.out_plane);
      Sampler::template sample_columns<D>(geo, input.template const_data_ptr<scalar_t>(),
                                          offset.template const_data_ptr<scalar_t>(),
                                          mask ? mask->template const_data_ptr<scalar_t>() : nullptr, b0, n,
                                          columns.template mutable_data_ptr<column_t>());
      layout.store_product(output, b0, n, geo.out_plane, w, cols, b.defined() ? &b : nullptr);
    }
  });
  return output;
}

template <typename Sampler>
at::Tensor deform_conv_forward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, const std::optional<at::Tensor>& mask) {
  check_deform_conv_args(input, offset, weight, bias, stride, padding, dilation, mask);
  return dispatch_spatial_dims(input.dim() - 2, [&](auto dims) {
    return deform_conv_forward_dims<Sampler, decltype(dims)::value>(input, offset, weight, bias, stride, padding,
                                                                    dilation, mask);
  });
}

using GradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename Sampler, int D>
GradTuple deform_conv_backward_dims(const at::Tensor& grad_output_arg, const at::Tensor& input_arg,
                                    const at::Tensor& offset_arg, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& mask_arg, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 5> output_mask) {
  using namespace driver_detail;
  const bool need_input = output_mask[0];
  const bool need_offset = output_mask[1];
  const bool need_weight = output_mask[2];
  const bool need_bias = output_mask[3];
  const bool need_mask = output_mask[4] && mask_arg.has_value();
  const auto geo = make_geometry<D>(input_arg, offset_arg, weight, stride, padding, dilation);
  const Layout<D, Sampler> layout(geo);
  const auto offset = offset_arg.contiguous();
  const auto mask = mask_arg ? std::optional<at::Tensor>(mask_arg->contiguous()) : std::nullopt;
  const auto grad_output = grad_output_arg.contiguous();
  const auto options = input_arg.options();
  const auto opmath_dtype = at::toOpMathType(input_arg.scalar_type());

  // The samplers write every element of grad_offset and grad_mask, and grad_input is either
  // accumulated in place (zeroed here) or copied whole from a zeroed buffer.
  const bool grad_input_in_place = !Sampler::kChannelsLast && input_arg.scalar_type() == opmath_dtype;
  auto grad_input = need_input ? (grad_input_in_place ? at::zeros(input_arg.sizes(), options)
                                                      : at::empty(input_arg.sizes(), options))
                               : not_requested(input_arg);
  auto grad_offset = need_offset ? at::empty_like(offset) : not_requested(input_arg);
  auto grad_mask = need_mask ? at::empty_like(*mask) : not_requested(input_arg);
  at::Tensor fused_grad_bias;  // where a fused backward computes it on the way
  // Allocated by the first chunk's GEMM, accumulated into by the others.
  at::Tensor grad_weight_rows;

  const bool need_sampling_grads = need_input || need_offset || need_mask;
  if (geo.batch > 0 && (need_weight || need_sampling_grads)) {
    const int64_t chunk = chunk_samples(geo, Sampler::column_budget());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_arg.scalar_type(), "dcnlab::deform_conv_backward", [&] {
      using column_t = typename Sampler::template column_t<scalar_t>;
      using opmath_t = at::opmath_type<scalar_t>;
      using grad_column_t = typename Sampler::template grad_column_t<scalar_t>;
      const auto column_dtype = c10::CppTypeToScalarType<column_t>::value;
      const auto grad_column_dtype = c10::CppTypeToScalarType<grad_column_t>::value;
      const auto w = layout.weight_rows(weight, column_dtype);
      // A backend may compute the whole backward without columns for some shapes and dtypes; it
      // takes the input as given (and may convert its layout a chunk at a time).
      if (Sampler::template backward_fused<D, scalar_t>(
              geo, input_arg, offset, mask, w, grad_output, {need_input, need_offset, need_mask, need_weight, need_bias},
              grad_input, grad_offset, grad_mask, grad_weight_rows, fused_grad_bias)) {
        return;
      }
      const auto input = layout.input(input_arg);
      // grad_input accumulates in an opmath buffer, one chunk at a time, except when it already
      // has the buffer's dtype and layout.
      const auto grad_input_buffer = need_input && !grad_input_in_place
                                         ? layout.grad_input_buffer(chunk, geo, options.dtype(opmath_dtype))
                                         : at::Tensor();
      const scalar_t* input_ptr = input.template const_data_ptr<scalar_t>();
      const scalar_t* offset_ptr = offset.template const_data_ptr<scalar_t>();
      const scalar_t* mask_ptr = mask ? mask->template const_data_ptr<scalar_t>() : nullptr;
      at::Tensor columns;
      if (need_weight) {
        columns = at::empty({geo.in_channels * geo.kernel_points * chunk * geo.out_plane}, options.dtype(column_dtype));
      }
      for (int64_t b0 = 0; b0 < geo.batch; b0 += chunk) {
        const int64_t n = std::min(chunk, geo.batch - b0);
        const auto grad_out = layout.grad_out_rows(grad_output, b0, n, geo.out_plane, column_dtype);
        column_t* columns_ptr = need_weight ? columns.template mutable_data_ptr<column_t>() : nullptr;
        if (need_sampling_grads) {
          const auto grad_cols = layout.grad_columns(w, grad_out, grad_column_dtype);
          at::Tensor grad_input_target;
          if (need_input) {
            grad_input_target =
                grad_input_in_place ? grad_input.narrow(0, b0, n) : grad_input_buffer.narrow(0, 0, n).zero_();
          }
          Sampler::template sampling_grads<D>(
              geo, input_ptr, offset_ptr, mask_ptr, b0, n, grad_cols.template const_data_ptr<grad_column_t>(),
              need_offset ? grad_offset.template mutable_data_ptr<scalar_t>() : nullptr,
              need_mask ? grad_mask.template mutable_data_ptr<scalar_t>() : nullptr,
              need_input ? grad_input_target.template mutable_data_ptr<opmath_t>() : nullptr, columns_ptr);
          if (need_input && !grad_input_in_place) layout.store_grad_input(grad_input, b0, n, grad_input_buffer);
        } else {
          Sampler::template sample_columns<D>(geo, input_ptr, offset_ptr, mask_ptr, b0, n, columns_ptr);
        }
        if (need_weight) {
          const auto cols_t = layout.columns(columns, n, geo.out_plane).transpose(1, 2);
          if (b0 == 0) {
            grad_weight_rows = gemm(grad_out, cols_t, opmath_dtype);
          } else {
            gemm_accumulate(grad_weight_rows, grad_out, cols_t);
          }
        }
      }
    });
  }
  at::Tensor grad_weight;
  if (!need_weight) {
    grad_weight = not_requested(input_arg);
  } else if (grad_weight_rows.defined()) {
    grad_weight = layout.weight_from_rows(grad_weight_rows, weight);
  } else {
    grad_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);  // empty batch
  }
  auto grad_bias = not_requested(input_arg);
  if (need_bias) grad_bias = fused_grad_bias.defined() ? fused_grad_bias : Sampler::bias_grad(grad_output);
  return std::make_tuple(grad_input, grad_offset, grad_weight, grad_bias, grad_mask);
}

template <typename Sampler>
GradTuple deform_conv_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
                               const at::Tensor& weight, const std::optional<at::Tensor>& mask,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               std::array<bool, 5> output_mask) {
  check_deform_conv_backward_args(grad_output, input, offset, weight, mask, stride, padding, dilation);
  return dispatch_spatial_dims(input.dim() - 2, [&](auto dims) {
    return deform_conv_backward_dims<Sampler, decltype(dims)::value>(grad_output, input, offset, weight, mask, stride,
                                                                     padding, dilation, output_mask);
  });
}

}  // namespace dcnlab
