// Transposing copies between (B, C, *spatial) and the channels-last (B, *spatial, C) layout of the
// CUDA kernels, tiled through shared memory so that both the reads and the writes run along
// contiguous memory. PyTorch's strided copy of a transpose (movedim(1, -1).contiguous()) reads
// or writes with a stride of C or L elements; measured on H100 (docs/perf-notes.md, session 5) it
// took 41 us for the 16.8 MB input of B8 C64 128x128 and 99 us for B32 C128 4096, a fifth to a
// quarter of the whole fused forward; these kernels took 26 and 50 us there (and 19.8 and 37.7
// us on H200 in session 6).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <type_traits>
#include <vector>

namespace dcnlab {
namespace layout_copy {

constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;  // block: kTile x kRowsPerPass threads

// V consecutive elements, read or written as one access.
template <typename T, int V>
struct alignas(V * sizeof(T)) Run {
  T v[V];
};

// dst[b][c][r] = src[b][r][c] for `batch` row-major (rows x cols) matrices, with a cast, in tiles
// of (32 V)^2 elements; each access moves V consecutive elements (V = 2: a warp moves 64 elements
// of a row, 128 bytes of a 16-bit type; rows, cols and the pointers must then be multiples of 2).
template <int V, typename in_t, typename out_t>
__global__ void __launch_bounds__(kTile * kRowsPerPass)
    transpose_kernel(const in_t* __restrict__ src, out_t* __restrict__ dst, int64_t batch, int64_t rows, int64_t cols,
                     int64_t col_tiles) {
  constexpr int kWide = V * kTile;
  using stage_t = std::conditional_t<sizeof(in_t) == 8 || sizeof(out_t) == 8, double, float>;
  __shared__ stage_t tile[kWide][kWide + 1];  // + 1: column reads spread over the banks
  const int64_t r0 = static_cast<int64_t>(blockIdx.x / col_tiles) * kWide;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x % col_tiles) * kWide;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  // Each thread issues all of its kPasses loads before it stores any of them (a loop over rows
  // that stored each load before the next one took 24.4 instead of 19.8 us for B8 C64 128x128
  // on H200).
  constexpr int kPasses = kWide / kRowsPerPass;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const in_t* source = src + b * rows * cols;
    out_t* target = dst + b * rows * cols;
    Run<in_t, V> runs[kPasses];
    const int64_t c = c0 + V * tx;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int64_t r = r0 + ty + p * kRowsPerPass;
      if (r < rows && c < cols) {  // cols is a multiple of V: the run is whole
        runs[p] = *reinterpret_cast<const Run<in_t, V>*>(source + r * cols + c);
      }
    }
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int i = ty + p * kRowsPerPass;
      if (r0 + i < rows && c < cols) {
        for (int v = 0; v < V; ++v) tile[i][V * tx + v] = static_cast<stage_t>(runs[p].v[v]);
      }
    }
    __syncthreads();
    const int64_t r = r0 + V * tx;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int i = ty + p * kRowsPerPass;
      const int64_t column = c0 + i;
      if (r < rows && column < cols) {
        Run<out_t, V> run;
        for (int v = 0; v < V; ++v) run.v[v] = static_cast<out_t>(tile[V * tx + v][i]);
        *reinterpret_cast<Run<out_t, V>*>(target + column * rows + r) = run;
      }
    }
    __syncthreads();
  }
}

// dst (batch, cols, rows) <- src (batch, rows, cols); both contiguous on one device. Returns false
// (nothing copied) for a dtype pair it does not handle.
inline bool transpose(const at::Tensor& src, at::Tensor& dst, int64_t batch, int64_t rows, int64_t cols) {
  const bool same = src.scalar_type() == dst.scalar_type();
  const bool narrowing = src.scalar_type() == at::kFloat &&
                         (dst.scalar_type() == at::kHalf || dst.scalar_type() == at::kBFloat16);
  if (!same && !narrowing) return false;
  const bool pairs = rows % 2 == 0 && cols % 2 == 0 &&
                     reinterpret_cast<uintptr_t>(src.const_data_ptr()) % (2 * src.element_size()) == 0 &&
                     reinterpret_cast<uintptr_t>(dst.const_data_ptr()) % (2 * dst.element_size()) == 0;
  const int tile = pairs ? 2 * kTile : kTile;
  const int64_t row_tiles = (rows + tile - 1) / tile;
  const int64_t col_tiles = (cols + tile - 1) / tile;
  if (row_tiles * col_tiles >= (int64_t(1) << 31)) return false;
  if (batch == 0 || rows == 0 || cols == 0) return true;
  const dim3 grid(static_cast<unsigned>(row_tiles * col_tiles), static_cast<unsigned>(std::min<int64_t>(batch, 65535)));
  const dim3 block(kTile, kRowsPerPass);
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto in_type, auto out_type) {
    using in_t = decltype(in_type);
    using out_t = decltype(out_type);
    const in_t* source = src.const_data_ptr<in_t>();
    out_t* target = dst.mutable_data_ptr<out_t>();
    if (pairs) {
      transpose_kernel<2, in_t, out_t><<<grid, block, 0, stream>>>(source, target, batch, rows, cols, col_tiles);
    } else {
      transpose_kernel<1, in_t, out_t><<<grid, block, 0, stream>>>(source, target, batch, rows, cols, col_tiles);
    }
  };
  if (same) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "dcnlab::transpose",
                                    [&] { launch(scalar_t(), scalar_t()); });
  } else {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dst.scalar_type(), "dcnlab::transpose", [&] { launch(float(), scalar_t()); });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// (B, C, *spatial) -> (B, *spatial, C), contiguous. An input already in that order (e.g. in
// torch.channels_last memory format) is returned as a view.
inline at::Tensor to_channels_last(const at::Tensor& input) {
  auto moved = input.movedim(1, -1);
  if (moved.is_contiguous() || !input.is_contiguous() || input.dim() < 3) return moved.contiguous();
  auto result = at::empty(moved.sizes(), input.options());
  const int64_t batch = input.size(0);
  const int64_t channels = input.size(1);
  const int64_t plane = batch * channels > 0 ? input.numel() / (batch * channels) : 0;
  if (!transpose(input, result, batch, channels, plane)) return moved.contiguous();
  return result;
}

// target (n, C, *spatial) <- source (n, *spatial, C) (contiguous), cast to target's dtype.
inline void from_channels_last(at::Tensor& target, const at::Tensor& source) {
  const int64_t batch = target.size(0);
  const int64_t channels = target.size(1);
  const int64_t plane = batch * channels > 0 ? target.numel() / (batch * channels) : 0;
  if (target.is_contiguous() && source.is_contiguous() && transpose(source, target, batch, plane, channels)) return;
  std::vector<int64_t> shape(target.sizes().begin(), target.sizes().end());
  shape.erase(shape.begin() + 1);
  shape.push_back(channels);
  target.copy_(source.view(shape).movedim(-1, 1));
}

// The channels-last conversions of the driver's Layout (deform_conv_driver.h) for CUDA tensors.
struct ChannelsLast {
  static constexpr bool kChannelsLast = true;
  static at::Tensor to_channels_last(const at::Tensor& input) { return layout_copy::to_channels_last(input); }
  static void from_channels_last(at::Tensor& target, const at::Tensor& buffer) {
    layout_copy::from_channels_last(target, buffer);
  }
};

}  // namespace layout_copy
}  // namespace dcnlab
