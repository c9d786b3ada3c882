// Fused forward of the deformable convolution for half types: an implicit GEMM on tensor cores.
//
// The product is output (M = B*L, C_out/G) = columns (M, R) @ weight_rows^T (R, C_out/G) per
// conv group, with R = K*C_in/G in the order r = k*C_in/G + c (the order of weight_rows in the
// driver's channels-last layout). The columns never exist in device memory: a block owns a tile
// of BM output positions x BN output channels and walks R in chunks of kBK channels of one
// kernel point. For each chunk it gathers the tile's sampled, modulated input values straight
// into shared memory (the N-linear stencil of each (position, kernel point, offset group) is
// built once into shared memory and reused for every channel chunk of that offset group),
// loads the matching weight slice, and multiplies with WMMA fragments (fp32 accumulation). The
// epilogue adds the bias in fp32 and writes (B, C_out, *out) directly.
//
// Where it is used: the gather costs ~10 instructions per element (fp32 interpolation) and is
// repeated for every tile of output channels, so it beats im2col + cuBLAS on narrow layers
// (<= 128 channels per group: 1.2-2.4x faster on H200) and loses on 256-512 channels (~2x
// slower); docs/perf-notes.md has the measurements (v7, v8) and the profile.
//
// Conditions (checked by the caller, which falls back to the im2col path otherwise): half or
// bfloat16, sm_80 or newer, C_in/G and C_in/offset_groups multiples of kBK (a chunk lies in one
// conv group and one offset group), 16-byte aligned input and weight rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdlib>
#include <string>

namespace dcnlab {
namespace implicit_gemm {

constexpr int kThreads = 256;  // 8 warps: 4 along M x 2 along N
constexpr int kBK = 32;        // channels per reduction chunk
constexpr int kLd = kBK + 8;   // shared row length in elements: 80 bytes, keeps 32-byte fragment alignment
constexpr int kPack = 8;       // channels per 16-byte gather
constexpr int64_t kMaxFusedChannels = 128;  // per conv group, input and output (see applies())

template <typename T>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Asynchronous 16-byte copy global -> shared (sm_80+); with src_bytes = 0 it writes zeros.
__device__ __forceinline__ void copy_async_16(void* shared, const void* global, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(src_bytes));
#endif
}

__device__ __forceinline__ void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::);
#endif
}

// 16 zero bytes: the source of the gather for interpolation corners outside the input, so that
// the inner loop needs no per-element select (and a non-finite input element can never leak
// into a point that does not touch it).
__device__ __align__(16) unsigned char zero_pack[16];

// Corners of one (position, kernel point, offset group) of the tile: element offsets into the
// channels-last input including the sample's base, -1 for a corner outside the input.
template <int D>
struct TilePoint {
  static constexpr int kCorners = 1 << D;
  int64_t index[kCorners];
  float weight[kCorners];  // N-linear weight times the modulation
};

template <int D, int BM, int BN>
struct alignas(128) SharedTile {
  union {
    struct {
      __align__(32) uint16_t a[BM * kLd];  // sampled values, row-major (position, channel)
      __align__(32) uint16_t b[BN * kLd];  // weight slice, (output channel, channel) = B col-major
    } operands;
    __align__(32) float scratch[kThreads / 32][16 * 16];  // epilogue: one fragment per warp
  };
  TilePoint<D> points[BM];
  int64_t out_base[BM];  // b * C_out * L + l of each tile row, -1 past the end
};

// Tiles: BM output positions x BN output channels; 8 warps as (BM / 32) x (8 / (BM / 32)), each
// warp 32 rows x BN / (8 / (BM / 32)) columns.
template <int D, int BM, int BN, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2)
    forward_kernel(const ConvGeometry<D> geo, const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                   const scalar_t* __restrict__ mask, const scalar_t* __restrict__ weight_rows,
                   const scalar_t* __restrict__ bias, scalar_t* __restrict__ output) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using T = typename WmmaType<scalar_t>::type;
  constexpr int kWarpsM = BM / 32;
  constexpr int kWarpsN = (kThreads / 32) / kWarpsM;
  constexpr int kWarpN = BN / kWarpsN;  // columns per warp
  constexpr int kFragM = 2;             // 32 rows per warp
  constexpr int kFragN = kWarpN / 16;
  constexpr int kPacksPerRow = kBK / kPack;
  constexpr int kCorners = TilePoint<D>::kCorners;
  static_assert(kWarpsM * kWarpsN == kThreads / 32 && kWarpN % 16 == 0, "tile shape");
  __shared__ SharedTile<D, BM, BN> smem;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int warp_m = warp / kWarpsN;
  const int warp_n = warp % kWarpsN;
  const int64_t L = geo.out_plane;
  const int64_t M = geo.batch * L;
  const int64_t C = geo.in_channels;
  const int in_per_group = static_cast<int>(C / geo.groups);
  const int per_offset_group = static_cast<int>(C / geo.offset_groups);
  const int64_t out_per_group = geo.out_channels / geo.groups;
  const int64_t R = static_cast<int64_t>(in_per_group) * geo.kernel_points;
  const int64_t tiles_n = (out_per_group + BN - 1) / BN;
  const int64_t g = blockIdx.y / tiles_n;
  const int64_t n0 = (blockIdx.y % tiles_n) * BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const scalar_t* zeros = reinterpret_cast<const scalar_t*>(zero_pack);

  if (tid < BM) {
    const int64_t m = m0 + tid;
    smem.out_base[tid] = m < M ? (m / L) * geo.out_channels * L + m % L : -1;
  }

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragM][kFragN];
  for (int i = 0; i < kFragM; ++i)
    for (int j = 0; j < kFragN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const T* a_tile = reinterpret_cast<const T*>(smem.operands.a);
  const T* b_tile = reinterpret_cast<const T*>(smem.operands.b);
  const scalar_t* weight_block = weight_rows + (g * out_per_group + n0) * R;
  for (int k = 0; k < geo.kernel_points; ++k) {
    // The chunk's offset group: its first channel c_abs over per_offset_group, kept up to date
    // instead of divided (chunks never straddle two offset groups).
    int og = static_cast<int>(g * in_per_group / per_offset_group);
    int og_end = (og + 1) * per_offset_group;
    bool rebuild = true;
    for (int c0 = 0; c0 < in_per_group; c0 += kBK) {
      const int64_t c_abs = g * in_per_group + c0;  // first input channel of the chunk
      if (c_abs >= og_end) {
        ++og;
        og_end += per_offset_group;
        rebuild = true;
      }
      __syncthreads();  // the previous chunk's fragments and stencils are consumed
      if (rebuild) {
        rebuild = false;
        if (tid < BM) {
          TilePoint<D>& point = smem.points[tid];
          const int64_t m = m0 + tid;
          Stencil<D, float> stencil;
          float modulation = 0;
          if (m < M) {
            const int64_t b = m / L;
            modulation = load_sample_point(geo, offset, mask, b, og, k, m % L, stencil);
            for (int corner = 0; corner < kCorners; ++corner) {
              stencil.index[corner] = (b * geo.in_plane + stencil.index[corner]) * C;
            }
          } else {
            for (int corner = 0; corner < kCorners; ++corner) stencil.inside[corner] = false;
          }
          for (int corner = 0; corner < kCorners; ++corner) {
            point.index[corner] = stencil.inside[corner] ? stencil.index[corner] : -1;
            // Outside corners read zeros; their weight is only the modulation, so that a
            // non-finite mask still gives what the other paths give (modulation * 0).
            point.weight[corner] = modulation * (stencil.inside[corner] ? stencil.weight[corner] : 1.0f);
          }
        }
        __syncthreads();
      }
      // Weight slice: BN output channels x kBK channels of kernel point k, copied asynchronously
      // while this thread gathers (a plain load would hold the store until the data arrives).
      for (int p = tid; p < BN * kPacksPerRow; p += kThreads) {
        const int col = p / kPacksPerRow;
        const int pack = p % kPacksPerRow;
        const bool valid = n0 + col < out_per_group;
        const scalar_t* source =
            valid ? weight_block + col * R + static_cast<int64_t>(k) * in_per_group + c0 + pack * kPack : weight_rows;
        copy_async_16(smem.operands.b + col * kLd + pack * kPack, source, valid ? 16 : 0);
      }
      // Gather: BM rows x kBK/kPack packs.
      for (int p = tid; p < BM * kPacksPerRow; p += kThreads) {
        const int row = p / kPacksPerRow;
        const int pack = p % kPacksPerRow;
        const TilePoint<D>& point = smem.points[row];
        const scalar_t* channels = input + c_abs + pack * kPack;
        Pack<scalar_t, kPack> corners[kCorners];
        for (int corner = 0; corner < kCorners; ++corner) {
          const int64_t index = point.index[corner];
          corners[corner] = *reinterpret_cast<const Pack<scalar_t, kPack>*>(index >= 0 ? channels + index : zeros);
        }
        float values[kPack] = {};
        for (int corner = 0; corner < kCorners; ++corner) {
          const float weight = point.weight[corner];
          for (int v = 0; v < kPack; ++v) values[v] += weight * static_cast<float>(corners[corner].v[v]);
        }
        Pack<scalar_t, kPack> out;
        for (int v = 0; v < kPack; ++v) out.v[v] = static_cast<scalar_t>(values[v]);
        *reinterpret_cast<Pack<scalar_t, kPack>*>(smem.operands.a + row * kLd + pack * kPack) = out;
      }
      copy_async_wait_all();
      __syncthreads();
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[kFragM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[kFragN];
        for (int f = 0; f < kFragM; ++f) wmma::load_matrix_sync(a[f], a_tile + (warp_m * 32 + f * 16) * kLd + kk, kLd);
        for (int f = 0; f < kFragN; ++f) wmma::load_matrix_sync(b[f], b_tile + (warp_n * kWarpN + f * 16) * kLd + kk, kLd);
        for (int fm = 0; fm < kFragM; ++fm)
          for (int fn = 0; fn < kFragN; ++fn) wmma::mma_sync(acc[fm][fn], a[fm], b[fn], acc[fm][fn]);
      }
    }
  }

  __syncthreads();  // the operand tiles become the epilogue scratch
  float* scratch = smem.scratch[warp];
  for (int i = 0; i < kFragM; ++i) {
    for (int j = 0; j < kFragN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_col_major);
      __syncwarp();
      // Lanes 0-15 and 16-31 each write 16 consecutive positions of one output channel.
      for (int e = lane; e < 256; e += 32) {
        const int tile_row = warp_m * 32 + i * 16 + e % 16;
        const int64_t col = n0 + warp_n * kWarpN + j * 16 + e / 16;
        const int64_t base = smem.out_base[tile_row];
        if (base >= 0 && col < out_per_group) {
          const int64_t channel = g * out_per_group + col;
          float value = scratch[e];
          if (bias) value += static_cast<float>(bias[channel]);
          output[base + channel * L] = static_cast<scalar_t>(value);
        }
      }
      __syncwarp();
    }
  }
#endif
}

// DCNLAB_CUDA_PATH: "im2col" never fuses, "fused" fuses wherever the kernels can (for
// measurements), anything else (or unset) picks per shape.
inline std::string requested_path() {
  const char* path_variable = std::getenv("DCNLAB_CUDA_PATH");
  return path_variable ? path_variable : "auto";
}

// Whether the fused forward handles this call; the caller uses the im2col path otherwise.
template <int D>
bool applies(const ConvGeometry<D>& geo, const at::Tensor& input_channels_last, const at::Tensor& weight_rows) {
  const auto dtype = input_channels_last.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const std::string path = requested_path();
  if (path == "im2col") return false;
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;
  const int64_t in_per_group = geo.in_channels / geo.groups;
  // Measured on H200 (docs/perf-notes.md, v8): faster than im2col for C_in/G = C_out/G <= 128
  // (1.2-2.4x), ~2x slower for 256 and 512.
  const bool wide = in_per_group > kMaxFusedChannels || geo.out_channels / geo.groups > kMaxFusedChannels;
  if (wide && path != "fused") return false;
  return in_per_group % kBK == 0 && geo.channels_per_offset_group() % kBK == 0 &&
         reinterpret_cast<uintptr_t>(input_channels_last.const_data_ptr()) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(weight_rows.const_data_ptr()) % 16 == 0 &&
         (geo.batch * geo.out_plane + 63) / 64 < (int64_t(1) << 31) &&
         geo.in_channels < (int64_t(1) << 30);
}

template <int D, typename scalar_t>
void forward(const ConvGeometry<D>& geo, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
             const scalar_t* weight_rows, const scalar_t* bias, scalar_t* output) {
  const int64_t out_per_group = geo.out_channels / geo.groups;
  const auto stream = at::cuda::getCurrentCUDAStream();
  // One tile of output channels where possible: the gather is repeated for every tile.
  auto launch = [&](auto kernel, int block_m, int block_n) {
    const int64_t m_tiles = (geo.batch * geo.out_plane + block_m - 1) / block_m;
    const dim3 grid(static_cast<unsigned>(m_tiles),
                    static_cast<unsigned>(geo.groups * ((out_per_group + block_n - 1) / block_n)));
    kernel<<<grid, kThreads, 0, stream>>>(geo, input, offset, mask, weight_rows, bias, output);
  };
  if (out_per_group > 128) {
    launch(forward_kernel<D, 64, 256, scalar_t>, 64, 256);
  } else if (out_per_group > 64) {
    launch(forward_kernel<D, 128, 128, scalar_t>, 128, 128);
  } else {
    launch(forward_kernel<D, 128, 64, scalar_t>, 128, 64);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace implicit_gemm
}  // namespace dcnlab
