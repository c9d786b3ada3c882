// CUDA kernels of dcnlab::deform_conv: the deformable sampling. The GEMMs (cuBLAS through
// at::bmm) and chunking live in deform_conv_driver.h; the interpolation math in sampling.h.
//
// The CUDA sampler uses the driver's channels-last layout: the input is (B, *in, C_in) and the
// columns hold the channels of one sample point contiguously. Each sample point is handled by a
// team of lanes of one warp (up to 32, enough to cover the channels of an offset group), lane r
// taking channels r, r + team, ... So the team builds the point's stencil once, its input reads,
// column writes and grad_input atomics touch consecutive addresses, and the channel sums of the
// offset and mask gradients are warp shuffles rather than atomics.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../deform_conv_driver.h"

namespace dcnlab {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// Sample point index -> (local sample, offset group, kernel point, output position).
struct PointIndex {
  int64_t b_local, g, k, l;
};

template <int D>
__device__ __forceinline__ PointIndex split_point(const ConvGeometry<D>& geo, int64_t point) {
  PointIndex p;
  p.l = point % geo.out_plane;
  point /= geo.out_plane;
  p.k = point % geo.kernel_points;
  point /= geo.kernel_points;
  p.g = point % geo.offset_groups;
  p.b_local = point / geo.offset_groups;
  return p;
}

// Index of channel c of point p in the (G, n*L, C_in/G * K) columns, row order (k, c).
template <int D>
__device__ __forceinline__ int64_t column_index(const ConvGeometry<D>& geo, int64_t n, const PointIndex& p, int64_t c) {
  const int64_t in_per_group = geo.in_channels / geo.groups;
  const int64_t conv_group = c / in_per_group;
  const int64_t row = (conv_group * n + p.b_local) * geo.out_plane + p.l;
  return row * in_per_group * geo.kernel_points + p.k * in_per_group + (c - conv_group * in_per_group);
}

// log2 of the team size: the smallest power of two covering the channels, at most a warp.
inline int team_shift(int64_t channels) {
  int shift = 0;
  while ((int64_t(1) << shift) < channels && (1 << shift) < kWarp) ++shift;
  return shift;
}

struct Launch {
  dim3 grid;
  int shift;
  cudaStream_t stream;
};

template <int D>
Launch launch_over_points(const ConvGeometry<D>& geo, int64_t n) {
  const int shift = team_shift(geo.channels_per_offset_group());
  const int64_t threads = (n * geo.offset_groups * geo.kernel_points * geo.out_plane) << shift;
  const int64_t blocks = std::clamp<int64_t>((threads + kThreads - 1) / kThreads, 1, int64_t(1) << 20);
  return {dim3(static_cast<unsigned>(blocks)), shift, at::cuda::getCurrentCUDAStream()};
}

template <int D, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sample_columns_kernel(const ConvGeometry<D> geo, const scalar_t* __restrict__ input,
                          const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t b0,
                          int64_t n, int shift, scalar_t* __restrict__ columns) {
  using coord_t = at::opmath_type<scalar_t>;
  const int64_t points = n * geo.offset_groups * geo.kernel_points * geo.out_plane;
  const int64_t per_group = geo.channels_per_offset_group();
  const int team = 1 << shift;
  const int lane = threadIdx.x & (team - 1);
  const int64_t step = (static_cast<int64_t>(gridDim.x) * kThreads) >> shift;
  for (int64_t point = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> shift; point < points;
       point += step) {
    const PointIndex p = split_point(geo, point);
    const int64_t b = b0 + p.b_local;
    Stencil<D, coord_t> stencil;
    const coord_t modulation = load_sample_point(geo, offset, mask, b, p.g, p.k, p.l, stencil);
    const scalar_t* sample_input = input + b * geo.in_plane * geo.in_channels;
    for (int64_t c = p.g * per_group + lane; c < (p.g + 1) * per_group; c += team) {
      const coord_t value = interpolate<D, coord_t>(stencil, sample_input + c, geo.in_channels);
      columns[column_index(geo, n, p, c)] = static_cast<scalar_t>(modulation * value);
    }
  }
}

// One pass for all sampling gradients: each (point, channel) reads its gradient column once,
// adds its share to the point's offset and mask gradients and scatters into grad_input (fp32 for
// half types, so the atomics are native fp32/fp64 adds).
template <int D, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sampling_grads_kernel(const ConvGeometry<D> geo, const scalar_t* __restrict__ input,
                          const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t b0,
                          int64_t n, int shift, const at::opmath_type<scalar_t>* __restrict__ grad_columns,
                          scalar_t* __restrict__ grad_offset, scalar_t* __restrict__ grad_mask,
                          at::opmath_type<scalar_t>* __restrict__ grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t points = n * geo.offset_groups * geo.kernel_points * geo.out_plane;
  const int64_t per_group = geo.channels_per_offset_group();
  const int64_t C = geo.in_channels;
  const int team = 1 << shift;
  const int lane = threadIdx.x & (team - 1);
  const bool want_position = grad_offset != nullptr || grad_mask != nullptr;
  const int64_t step = (static_cast<int64_t>(gridDim.x) * kThreads) >> shift;
  // The loop runs over the warp's first point so that whole warps iterate together, as the
  // shuffles below require.
  const int64_t warp_first_thread = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) & ~int64_t(kWarp - 1);
  for (int64_t base = warp_first_thread >> shift; base < points; base += step) {
    const int64_t point = base + ((threadIdx.x & (kWarp - 1)) >> shift);
    const bool valid = point < points;
    acc_t grad_pos[D] = {};
    acc_t grad_mod = 0;
    PointIndex p{};
    acc_t modulation = 0;
    if (valid) {
      p = split_point(geo, point);
      const int64_t b = b0 + p.b_local;
      Stencil<D, acc_t> stencil;
      modulation = load_sample_point(geo, offset, mask, b, p.g, p.k, p.l, stencil);
      const scalar_t* sample_input = input + b * geo.in_plane * C;
      acc_t* sample_grad_input = grad_input ? grad_input + p.b_local * geo.in_plane * C : nullptr;
      for (int64_t c = p.g * per_group + lane; c < (p.g + 1) * per_group; c += team) {
        const acc_t grad = grad_columns[column_index(geo, n, p, c)];
        if (want_position) {
          acc_t dvalue[D];
          const acc_t value = interpolate_with_position_grad<D, acc_t>(stencil, sample_input + c, dvalue, C);
          grad_mod += grad * value;
          for (int a = 0; a < D; ++a) grad_pos[a] += grad * dvalue[a];
        }
        if (sample_grad_input) {
          const acc_t scaled = grad * modulation;
          for (int corner = 0; corner < Stencil<D, acc_t>::kCorners; ++corner) {
            if (stencil.inside[corner]) {
              atomicAdd(sample_grad_input + stencil.index[corner] * C + c, scaled * stencil.weight[corner]);
            }
          }
        }
      }
    }
    if (!want_position) continue;
    for (int delta = team / 2; delta > 0; delta /= 2) {
      for (int a = 0; a < D; ++a) grad_pos[a] += __shfl_xor_sync(0xffffffffu, grad_pos[a], delta);
      grad_mod += __shfl_xor_sync(0xffffffffu, grad_mod, delta);
    }
    if (valid && lane == 0) {
      const int64_t row = point_row(geo, b0 + p.b_local, p.g, p.k);
      const int64_t L = geo.out_plane;
      if (grad_offset) {
        for (int a = 0; a < D; ++a) grad_offset[(row * D + a) * L + p.l] = static_cast<scalar_t>(grad_pos[a] * modulation);
      }
      if (grad_mask) grad_mask[row * L + p.l] = static_cast<scalar_t>(grad_mod);
    }
  }
}

struct CudaSampler {
  template <typename scalar_t>
  using column_t = scalar_t;

  static constexpr bool kChannelsLast = true;

  static int64_t column_budget() { return int64_t(1) << 26; }

  template <int D, typename scalar_t>
  static void sample_columns(const ConvGeometry<D>& geo, const scalar_t* input, const scalar_t* offset,
                             const scalar_t* mask, int64_t b0, int64_t n, scalar_t* columns) {
    const auto l = launch_over_points(geo, n);
    sample_columns_kernel<D, scalar_t><<<l.grid, kThreads, 0, l.stream>>>(geo, input, offset, mask, b0, n, l.shift, columns);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <int D, typename scalar_t>
  static void sampling_grads(const ConvGeometry<D>& geo, const scalar_t* input, const scalar_t* offset,
                             const scalar_t* mask, int64_t b0, int64_t n, const at::opmath_type<scalar_t>* grad_columns,
                             scalar_t* grad_offset, scalar_t* grad_mask, at::opmath_type<scalar_t>* grad_input) {
    const auto l = launch_over_points(geo, n);
    sampling_grads_kernel<D, scalar_t><<<l.grid, kThreads, 0, l.stream>>>(
        geo, input, offset, mask, b0, n, l.shift, grad_columns, grad_offset, grad_mask, grad_input);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor deform_conv_cuda(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, const std::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  return deform_conv_forward<CudaSampler>(input, offset, weight, bias, stride, padding, dilation, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  return deform_conv_backward<CudaSampler>(grad_output, input, offset, weight, mask, stride, padding, dilation,
                                           output_mask);
}

}  // namespace
}  // namespace dcnlab

TORCH_LIBRARY_IMPL(dcnlab, CUDA, m) {
  m.impl("deform_conv", &dcnlab::deform_conv_cuda);
  m.impl("deform_conv_backward", &dcnlab::deform_conv_backward_cuda);
}
