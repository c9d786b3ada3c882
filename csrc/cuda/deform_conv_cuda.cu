// CUDA kernels of dcnlab::deform_conv: the deformable sampling. The GEMMs (cuBLAS through
// at::bmm) and chunking live in deform_conv_driver.h; the interpolation math in sampling.h.
//
// Every kernel uses blocks of kPointLanes x kChannelSlices threads: the 32 lanes of a warp take
// 32 consecutive sample points (consecutive output positions, so column and gradient-column
// accesses coalesce) and the warps of a block split the channels of the offset group. Each
// thread builds the stencil of its point once and reuses it for all its channels.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../deform_conv_driver.h"

namespace dcnlab {
namespace {

constexpr int kPointLanes = 32;
constexpr int kChannelSlices = 8;

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

struct Launch {
  dim3 grid;
  dim3 block{kPointLanes, kChannelSlices};
  cudaStream_t stream;
};

// Grid-stride launch over `points` sample points.
inline Launch launch_over(int64_t points) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((points + kPointLanes - 1) / kPointLanes, int64_t(1) << 20));
  return {dim3(static_cast<unsigned>(blocks)), dim3(kPointLanes, kChannelSlices), at::cuda::getCurrentCUDAStream()};
}

__device__ __forceinline__ int64_t first_point() { return static_cast<int64_t>(blockIdx.x) * kPointLanes + threadIdx.x; }
__device__ __forceinline__ int64_t point_step() { return static_cast<int64_t>(gridDim.x) * kPointLanes; }

template <int D, typename scalar_t>
__global__ void __launch_bounds__(kPointLanes* kChannelSlices)
    sample_columns_kernel(const ConvGeometry<D> geo, const scalar_t* __restrict__ input,
                          const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t b0,
                          int64_t n, scalar_t* __restrict__ columns) {
  using coord_t = at::opmath_type<scalar_t>;
  const int64_t points = n * geo.offset_groups * geo.kernel_points * geo.out_plane;
  const int64_t per_group = geo.channels_per_offset_group();
  const int64_t channel_stride = geo.kernel_points * n * geo.out_plane;
  for (int64_t point = first_point(); point < points; point += point_step()) {
    const PointIndex p = split_point(geo, point);
    const int64_t b = b0 + p.b_local;
    Stencil<D, coord_t> stencil;
    const coord_t modulation = load_sample_point(geo, offset, mask, b, p.g, p.k, p.l, stencil);
    const int64_t column = (p.k * n + p.b_local) * geo.out_plane + p.l;
    for (int64_t c = p.g * per_group + threadIdx.y; c < (p.g + 1) * per_group; c += kChannelSlices) {
      const scalar_t* plane = input + (b * geo.in_channels + c) * geo.in_plane;
      columns[c * channel_stride + column] = static_cast<scalar_t>(modulation * interpolate<D, coord_t>(stencil, plane));
    }
  }
}

// The channel slices of a point reduce their partial gradients through shared memory, so each
// offset and mask gradient is written once, without atomics.
template <int D, typename scalar_t>
__global__ void __launch_bounds__(kPointLanes* kChannelSlices)
    position_grads_kernel(const ConvGeometry<D> geo, const scalar_t* __restrict__ input,
                          const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t b0,
                          int64_t n, const at::opmath_type<scalar_t>* __restrict__ grad_columns,
                          scalar_t* __restrict__ grad_offset, scalar_t* __restrict__ grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kChannelSlices][D + 1][kPointLanes];
  const int64_t points = n * geo.offset_groups * geo.kernel_points * geo.out_plane;
  const int64_t per_group = geo.channels_per_offset_group();
  const int64_t channel_stride = geo.kernel_points * n * geo.out_plane;
  // Every thread of the block runs the same number of iterations (the bound is uniform per
  // block), so the __syncthreads below are reached by all.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kPointLanes; base < points; base += point_step()) {
    const int64_t point = base + threadIdx.x;
    acc_t grad_pos[D] = {};
    acc_t grad_mod = 0;
    PointIndex p{};
    acc_t modulation = 0;
    if (point < points) {
      p = split_point(geo, point);
      const int64_t b = b0 + p.b_local;
      Stencil<D, acc_t> stencil;
      modulation = load_sample_point(geo, offset, mask, b, p.g, p.k, p.l, stencil);
      const int64_t column = (p.k * n + p.b_local) * geo.out_plane + p.l;
      for (int64_t c = p.g * per_group + threadIdx.y; c < (p.g + 1) * per_group; c += kChannelSlices) {
        const acc_t grad = grad_columns[c * channel_stride + column];
        acc_t dvalue[D];
        const acc_t value =
            interpolate_with_position_grad<D, acc_t>(stencil, input + (b * geo.in_channels + c) * geo.in_plane, dvalue);
        grad_mod += grad * value;
        for (int a = 0; a < D; ++a) grad_pos[a] += grad * dvalue[a];
      }
    }
    for (int a = 0; a < D; ++a) partial[threadIdx.y][a][threadIdx.x] = grad_pos[a];
    partial[threadIdx.y][D][threadIdx.x] = grad_mod;
    __syncthreads();
    if (threadIdx.y == 0 && point < points) {
      for (int s = 1; s < kChannelSlices; ++s) {
        for (int a = 0; a < D; ++a) grad_pos[a] += partial[s][a][threadIdx.x];
        grad_mod += partial[s][D][threadIdx.x];
      }
      const int64_t row = point_row(geo, b0 + p.b_local, p.g, p.k);
      const int64_t L = geo.out_plane;
      if (grad_offset) {
        for (int a = 0; a < D; ++a) grad_offset[(row * D + a) * L + p.l] = static_cast<scalar_t>(grad_pos[a] * modulation);
      }
      if (grad_mask) grad_mask[row * L + p.l] = static_cast<scalar_t>(grad_mod);
    }
    __syncthreads();
  }
}

// Scatters the gradient columns into grad_input (fp32 for half types, so the atomics are
// native fp32/fp64 adds).
template <int D, typename scalar_t>
__global__ void __launch_bounds__(kPointLanes* kChannelSlices)
    input_grads_kernel(const ConvGeometry<D> geo, const scalar_t* __restrict__ offset,
                       const scalar_t* __restrict__ mask, int64_t b0, int64_t n,
                       const at::opmath_type<scalar_t>* __restrict__ grad_columns,
                       at::opmath_type<scalar_t>* __restrict__ grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t points = n * geo.offset_groups * geo.kernel_points * geo.out_plane;
  const int64_t per_group = geo.channels_per_offset_group();
  const int64_t channel_stride = geo.kernel_points * n * geo.out_plane;
  for (int64_t point = first_point(); point < points; point += point_step()) {
    const PointIndex p = split_point(geo, point);
    Stencil<D, acc_t> stencil;
    const acc_t modulation = load_sample_point(geo, offset, mask, b0 + p.b_local, p.g, p.k, p.l, stencil);
    const int64_t column = (p.k * n + p.b_local) * geo.out_plane + p.l;
    for (int64_t c = p.g * per_group + threadIdx.y; c < (p.g + 1) * per_group; c += kChannelSlices) {
      const acc_t grad = grad_columns[c * channel_stride + column] * modulation;
      acc_t* plane = grad_input + (p.b_local * geo.in_channels + c) * geo.in_plane;
      for (int corner = 0; corner < Stencil<D, acc_t>::kCorners; ++corner) {
        if (stencil.inside[corner]) atomicAdd(plane + stencil.index[corner], grad * stencil.weight[corner]);
      }
    }
  }
}

struct CudaSampler {
  template <typename scalar_t>
  using column_t = scalar_t;

  static int64_t column_budget() { return int64_t(1) << 26; }

  template <int D, typename scalar_t>
  static void sample_columns(const ConvGeometry<D>& geo, const scalar_t* input, const scalar_t* offset,
                             const scalar_t* mask, int64_t b0, int64_t n, scalar_t* columns) {
    const auto l = launch_over(n * geo.offset_groups * geo.kernel_points * geo.out_plane);
    sample_columns_kernel<D, scalar_t><<<l.grid, l.block, 0, l.stream>>>(geo, input, offset, mask, b0, n, columns);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <int D, typename scalar_t>
  static void position_grads(const ConvGeometry<D>& geo, const scalar_t* input, const scalar_t* offset,
                             const scalar_t* mask, int64_t b0, int64_t n, const at::opmath_type<scalar_t>* grad_columns,
                             scalar_t* grad_offset, scalar_t* grad_mask) {
    const auto l = launch_over(n * geo.offset_groups * geo.kernel_points * geo.out_plane);
    position_grads_kernel<D, scalar_t>
        <<<l.grid, l.block, 0, l.stream>>>(geo, input, offset, mask, b0, n, grad_columns, grad_offset, grad_mask);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <int D, typename scalar_t>
  static void input_grads(const ConvGeometry<D>& geo, const scalar_t* offset, const scalar_t* mask, int64_t b0,
                          int64_t n, const at::opmath_type<scalar_t>* grad_columns,
                          at::opmath_type<scalar_t>* grad_input) {
    const auto l = launch_over(n * geo.offset_groups * geo.kernel_points * geo.out_plane);
    input_grads_kernel<D, scalar_t><<<l.grid, l.block, 0, l.stream>>>(geo, offset, mask, b0, n, grad_columns, grad_input);
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
