// Transposing copies between (B, C, *spatial) and the channels-last (B, *spatial, C) layout of the
// CUDA kernels, tiled through shared memory so that both the reads and the writes run along
// contiguous memory. PyTorch's strided copy of a transpose (movedim(1, -1).contiguous()) reads
// or writes with a stride of C or L elements; measured on H100 (docs/perf-notes.md, session 5) it
// took 41 us for the 16.8 MB input of B8 C64 128x128 and 99 us for B32 C128 4096, a fifth to a
// quarter of the whole fused forward; these kernels took 26 and 50 us there (and 19.8 and 37.7
// us on H200 in session 6).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
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

// dst[b][c][r] = src[b][r][c] in blocks of 8 x 8 elements held in registers, for a 16-bit dst and
// a 16-bit or fp32 src whose rows and cols are multiples of 8 and whose pointers are 16-byte
// aligned: each thread loads 8 src rows of 8 elements (16 or 32 bytes each) and stores 8 dst rows
// of 8 elements (16 bytes each), with no shared memory. A warp covers 32 src rows x 64 src cols
// (lane = rl + 4 cl: src rows 8 rl.., cols 8 cl..), so a src row's 8 lanes read 128 (fp32: 256)
// contiguous bytes and a dst row's 4 lanes write 64; warps walk the (batch, row tile, col tile)
// tiles grid-stride. 16-bit pairs are regrouped by byte permutes, fp32 pairs by one conversion to a
// 16-bit pair. transpose_kernel above took 12.0 us for the 8.4 MB bf16 copy of 8 samples of B32
// C128 4096 (91 registers: 2 blocks per SM, 16 KiB of loads in flight per SM) and 12.9 us for its
// fp32 -> bf16 copy back; this kernel 7.6 and 9.4 us (memcpy of the same bytes: 7.2) on H200 with
// a cold L2 (docs/perf-notes.md, session 11).
template <typename out_t>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  return static_cast<uint32_t>(static_cast<out_t>(lo).x) | (static_cast<uint32_t>(static_cast<out_t>(hi).x) << 16);
}

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(256)
    transpose8_kernel(const in_t* __restrict__ src, out_t* __restrict__ dst, int rows, int cols, int row_tiles,
                      int col_tiles, int tiles) {
  static_assert(sizeof(out_t) == 2 && (sizeof(in_t) == 2 || std::is_same_v<in_t, float>), "16-bit results");
  const int lane = threadIdx.x % 32;
  const int rl = lane % 4;
  const int cl = lane / 4;
  const int per_matrix = row_tiles * col_tiles;
  for (int t = static_cast<int>(blockIdx.x) * 8 + static_cast<int>(threadIdx.x) / 32; t < tiles;
       t += static_cast<int>(gridDim.x) * 8) {
    const int b = t / per_matrix;
    const int rest = t - b * per_matrix;
    const int rt = rest / col_tiles;
    const int r0 = rt * 32 + rl * 8;
    const int k0 = (rest - rt * col_tiles) * 64 + cl * 8;
    if (r0 >= rows || k0 >= cols) continue;
    const int64_t matrix = static_cast<int64_t>(b) * rows * cols;
    const in_t* source = src + matrix + static_cast<int64_t>(r0) * cols + k0;
    out_t* target = dst + matrix + static_cast<int64_t>(k0) * rows + r0;
    uint4 out[8];  // dst row k0 + j: src rows r0..r0+7 of col k0 + j, as 4 pairs
    if constexpr (sizeof(in_t) == 2) {
      uint4 in[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) in[r] = *reinterpret_cast<const uint4*>(source + static_cast<int64_t>(r) * cols);
      const uint32_t* x = reinterpret_cast<const uint32_t*>(in);  // x[4 r + i]: cols 2i, 2i+1 of row r
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t select = j % 2 ? 0x7632u : 0x5410u;  // the high or low halves of both words
        out[j] = make_uint4(__byte_perm(x[0 + j / 2], x[4 + j / 2], select),
                            __byte_perm(x[8 + j / 2], x[12 + j / 2], select),
                            __byte_perm(x[16 + j / 2], x[20 + j / 2], select),
                            __byte_perm(x[24 + j / 2], x[28 + j / 2], select));
      }
    } else {
      float4 in[8][2];
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        in[r][0] = *reinterpret_cast<const float4*>(source + static_cast<int64_t>(r) * cols);
        in[r][1] = *reinterpret_cast<const float4*>(source + static_cast<int64_t>(r) * cols + 4);
      }
      const float* x = reinterpret_cast<const float*>(in);  // x[8 r + j]
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        out[j] = make_uint4(pack_pair<out_t>(x[j], x[8 + j]), pack_pair<out_t>(x[16 + j], x[24 + j]),
                            pack_pair<out_t>(x[32 + j], x[40 + j]), pack_pair<out_t>(x[48 + j], x[56 + j]));
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) *reinterpret_cast<uint4*>(target + static_cast<int64_t>(j) * rows) = out[j];
  }
}

// The same for matrices with fewer than kTile rows or columns (the weights' (C_in/G, K) blocks,
// K = 9 or 27; inputs of a few channels), where most of a tile's threads would idle. index_t:
// 32-bit where the element count allows.
//
// kFewCols: a thread reads a row (the warp's reads are consecutive) and writes one element to each
// of the `cols` result rows (for each, the warp's writes are consecutive). Otherwise one thread per
// result element, in the result's order (writes consecutive, reads strided): walking the columns
// of a few-row matrix instead (reads consecutive, writes strided) took 14.0 instead of 8.3 us for
// the fp32 -> bf16 weight gradient of C512 k3 on H200 (docs/perf-notes.md, session 8), while this
// kFewCols walk took 4.1 instead of 8.5 us for its weight rows.
template <bool kFewCols, typename index_t, typename in_t, typename out_t>
__global__ void __launch_bounds__(256)
    small_transpose_kernel(const in_t* __restrict__ src, out_t* __restrict__ dst, index_t rows, index_t cols,
                           index_t work) {
  for (index_t w = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < work;
       w += static_cast<index_t>(gridDim.x) * blockDim.x) {
    if constexpr (kFewCols) {  // w: a row of one matrix
      const index_t matrix = w / rows;
      const index_t r = w - matrix * rows;
      const in_t* source = src + (matrix * rows + r) * cols;
      out_t* target = dst + matrix * rows * cols + r;
      for (index_t c = 0; c < cols; ++c) target[c * rows] = static_cast<out_t>(source[c]);
    } else {  // w: an element of the result
      const index_t plane = rows * cols;
      const index_t matrix = w / plane;
      const index_t within = w - matrix * plane;  // (c, r) of the result
      const index_t c = within / rows;
      const index_t r = within - c * rows;
      dst[w] = static_cast<out_t>(src[(matrix * rows + r) * cols + c]);
    }
  }
}

// Blocks for a grid-stride loop over `work` items of 256 threads: at most 8 per SM.
inline unsigned grid_stride_blocks(int64_t work) {
  const int64_t cap = 8 * int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + 255) / 256, cap)));
}

// dst (batch, cols, rows) <- src (batch, rows, cols); both contiguous on one device. Returns false
// (nothing copied) for a dtype pair it does not handle.
inline bool transpose(const at::Tensor& src, at::Tensor& dst, int64_t batch, int64_t rows, int64_t cols) {
  const bool same = src.scalar_type() == dst.scalar_type();
  const bool narrowing = src.scalar_type() == at::kFloat &&
                         (dst.scalar_type() == at::kHalf || dst.scalar_type() == at::kBFloat16);
  if (!same && !narrowing) return false;
  TORCH_INTERNAL_ASSERT(src.is_contiguous() && dst.is_contiguous() && src.numel() == batch * rows * cols &&
                        dst.numel() == batch * rows * cols);
  if (batch == 0 || rows == 0 || cols == 0) return true;
  const auto stream = at::cuda::getCurrentCUDAStream();
  // 16-bit results of sides that are multiples of 8 take transpose8_kernel, other matrices with a
  // side under kTile small_transpose_kernel, the rest the tiled kernel.
  const bool sixteen_bit_out = dst.scalar_type() == at::kHalf || dst.scalar_type() == at::kBFloat16;
  const int64_t row_tiles8 = (rows + 31) / 32;
  const int64_t col_tiles8 = (cols + 63) / 64;
  const int64_t tiles8 = batch * row_tiles8 * col_tiles8;
  const unsigned blocks8 = grid_stride_blocks(tiles8 * 32);  // a warp per tile, 8 per block
  if (sixteen_bit_out && rows % 8 == 0 && cols % 8 == 0 && rows < (int64_t(1) << 31) && cols < (int64_t(1) << 31) &&
      tiles8 < (int64_t(1) << 31) - 8 * int64_t(blocks8) &&
      reinterpret_cast<uintptr_t>(src.const_data_ptr()) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(dst.const_data_ptr()) % 16 == 0) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dst.scalar_type(), "dcnlab::transpose", [&] {
      auto launch8 = [&](const auto* source) {
        transpose8_kernel<<<blocks8, 256, 0, stream>>>(source, dst.mutable_data_ptr<scalar_t>(), static_cast<int>(rows),
                                                       static_cast<int>(cols), static_cast<int>(row_tiles8),
                                                       static_cast<int>(col_tiles8), static_cast<int>(tiles8));
      };
      same ? launch8(src.const_data_ptr<scalar_t>()) : launch8(src.const_data_ptr<float>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
  const bool small = std::min(rows, cols) < kTile;
  const bool few_cols = cols <= rows;
  const int64_t work = few_cols ? batch * rows : batch * rows * cols;
  const unsigned blocks = grid_stride_blocks(work);
  const bool narrow_index = batch * rows * cols < (int64_t(1) << 31) - 256 * int64_t(blocks);
  const bool pairs = rows % 2 == 0 && cols % 2 == 0 &&
                     reinterpret_cast<uintptr_t>(src.const_data_ptr()) % (2 * src.element_size()) == 0 &&
                     reinterpret_cast<uintptr_t>(dst.const_data_ptr()) % (2 * dst.element_size()) == 0;
  const int tile = pairs ? 2 * kTile : kTile;
  const int64_t row_tiles = (rows + tile - 1) / tile;
  const int64_t col_tiles = (cols + tile - 1) / tile;
  if (!small && row_tiles * col_tiles >= (int64_t(1) << 31)) return false;
  const dim3 grid(static_cast<unsigned>(row_tiles * col_tiles), static_cast<unsigned>(std::min<int64_t>(batch, 65535)));
  const dim3 block(kTile, kRowsPerPass);
  auto launch = [&](auto in_type, auto out_type) {
    using in_t = decltype(in_type);
    using out_t = decltype(out_type);
    const in_t* source = src.const_data_ptr<in_t>();
    out_t* target = dst.mutable_data_ptr<out_t>();
    if (small) {
      auto run = [&](auto few, auto index) {
        using index_t = decltype(index);
        small_transpose_kernel<decltype(few)::value, index_t, in_t, out_t><<<blocks, 256, 0, stream>>>(
            source, target, static_cast<index_t>(rows), static_cast<index_t>(cols), static_cast<index_t>(work));
      };
      using Few = std::true_type;
      using Many = std::false_type;
      if (narrow_index) {
        few_cols ? run(Few(), int32_t()) : run(Many(), int32_t());
      } else {
        few_cols ? run(Few(), int64_t()) : run(Many(), int64_t());
      }
    } else if (pairs) {
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

// dst[j][i] <- src[i][j] (+ bias[i]) for runs of `run` elements: (I, J, run) -> (J, I, run), both
// contiguous. The runs move as Run<T, V> words (16 bytes where their length and the pointers allow);
// one thread per word, grid-stride. With a bias (null: none) each element becomes
// T(opmath(element) + opmath(bias[i])): the GEMM result is rounded to T first, as PyTorch's
// cuDNN conv rounds its result before it adds the bias.
template <typename index_t, typename T, int V>
__global__ void __launch_bounds__(256)
    swap_rows_kernel(const Run<T, V>* __restrict__ src, Run<T, V>* __restrict__ dst, const T* __restrict__ bias,
                     index_t I, index_t J, index_t run_words, index_t total) {
  using opmath_t = at::opmath_type<T>;
  for (index_t w = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < total;
       w += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t row = w / run_words;  // i * J + j
    const index_t q = w - row * run_words;
    const index_t i = row / J;
    const index_t j = row - i * J;
    Run<T, V> word = src[w];
    if (bias != nullptr) {
      const opmath_t b = static_cast<opmath_t>(bias[i]);
      for (int v = 0; v < V; ++v) word.v[v] = static_cast<T>(static_cast<opmath_t>(word.v[v]) + b);
    }
    dst[(j * I + i) * run_words + q] = word;
  }
}

// The permutation (I, J, run) -> (J, I, run) of a contiguous src into a contiguous dst of the same
// dtype, as one launch, adding bias[i] (a contiguous tensor of I elements of that dtype) where
// given (a strided at::copy_ of the permuted view costs its TensorIterator set-up on the host each
// call, which the host-bound small-plane shapes pay in full; a bias broadcast into a baddbmm costs
// another copy and the GEMM's read of it).
inline void swap_rows(const at::Tensor& src, at::Tensor& dst, int64_t I, int64_t J, int64_t run,
                      const at::Tensor* bias = nullptr) {
  TORCH_CHECK(src.scalar_type() == dst.scalar_type() && src.is_contiguous() && dst.is_contiguous() &&
                  src.numel() == I * J * run && dst.numel() == I * J * run,
              "dcnlab: internal error: swap_rows needs two contiguous tensors of one dtype and I*J*run elements");
  TORCH_CHECK(bias == nullptr || (bias->scalar_type() == src.scalar_type() && bias->is_contiguous() &&
                                  bias->numel() == I && bias->device() == src.device()),
              "dcnlab: internal error: swap_rows needs a contiguous bias of I elements of the tensors' dtype");
  if (src.numel() == 0) return;
  const auto address = reinterpret_cast<uintptr_t>(src.const_data_ptr()) | reinterpret_cast<uintptr_t>(dst.const_data_ptr());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "dcnlab::swap_rows", [&] {
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t run_words = run / V;
      const int64_t total = I * J * run_words;
      const auto* source = reinterpret_cast<const Run<scalar_t, V>*>(src.const_data_ptr<scalar_t>());
      auto* target = reinterpret_cast<Run<scalar_t, V>*>(dst.mutable_data_ptr<scalar_t>());
      const scalar_t* b = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
      const unsigned blocks = grid_stride_blocks(total);
      if (total < (int64_t(1) << 31) - 256 * int64_t(blocks)) {
        swap_rows_kernel<int32_t, scalar_t, V><<<blocks, 256, 0, stream>>>(
            source, target, b, static_cast<int32_t>(I), static_cast<int32_t>(J), static_cast<int32_t>(run_words),
            static_cast<int32_t>(total));
      } else {
        swap_rows_kernel<int64_t, scalar_t, V><<<blocks, 256, 0, stream>>>(source, target, b, I, J, run_words, total);
      }
    };
    // Elements per word: the most of 16 bytes that the run's length and both pointers allow.
    auto fits = [&](int v) { return run % v == 0 && address % (v * sizeof(scalar_t)) == 0; };
    auto widest = [&](auto self, auto width) {
      constexpr int V = decltype(width)::value;
      if constexpr (V == 1) {
        launch(width);
      } else if (fits(V)) {
        launch(width);
      } else {
        self(self, std::integral_constant<int, V / 2>());
      }
    };
    widest(widest, std::integral_constant<int, 16 / sizeof(scalar_t)>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// Zeroes a tensor on the current stream: cudaMemsetAsync where it is contiguous (the fp32
// grad_input buffers: 33.5 MB for B8 C64 128x128), zero_() otherwise.
inline void zero(const at::Tensor& tensor) {
  if (tensor.is_contiguous()) {
    AT_CUDA_CHECK(cudaMemsetAsync(tensor.data_ptr(), 0, tensor.nbytes(), at::cuda::getCurrentCUDAStream()));
  } else {
    tensor.zero_();
  }
}

// The channels-last conversions of the driver's Layout (deform_conv_driver.h) for CUDA tensors.
struct ChannelsLast {
  static constexpr bool kChannelsLast = true;
  static at::Tensor to_channels_last(const at::Tensor& input) { return layout_copy::to_channels_last(input); }
  static void from_channels_last(at::Tensor& target, const at::Tensor& buffer) {
    layout_copy::from_channels_last(target, buffer);
  }
  static bool transpose(const at::Tensor& src, at::Tensor& dst, int64_t batch, int64_t rows, int64_t cols) {
    return layout_copy::transpose(src, dst, batch, rows, cols);
  }
  static void swap_rows(const at::Tensor& src, at::Tensor& dst, int64_t I, int64_t J, int64_t run,
                        const at::Tensor* bias = nullptr) {
    layout_copy::swap_rows(src, dst, I, J, run, bias);
  }
};

}  // namespace layout_copy
}  // namespace dcnlab
