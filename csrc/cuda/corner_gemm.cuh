// Fused forward of the deformable convolution for half types, corner form (v13): 1-D and 2-D.
//
// The forward of implicit_gemm.cuh blends the 2^D interpolation corners of every sampled element
// on CUDA cores (one conversion and one FMA per element and corner) and multiplies the blended,
// bf16-rounded columns on tensor cores. Here the blend moves behind the product instead: with
// x_c the input rows at corner c of a (position, kernel point k) and w_c its N-linear weight times
// the modulation,
//   out[p, o] = sum_k sum_c w_c[p, k] * (sum_i x_c[p, k, i] * W[o, k, i]),
// so for each (k, c) the block multiplies the raw corner rows, copied from global to shared memory
// with cp.async and never touched by the CUDA cores, by the weight slice of k into a partial
// accumulator, and adds it to the output accumulator scaled by w_c row by row (one FMA per
// accumulator element and (k, c)). The tensor cores do 2^D times the work of the dense product,
// which is cheap in 1-D and 2-D (2x and 4x) and not in 3-D (8x), where implicit_gemm.cuh's kernel
// stays. The sums are fp32 throughout; nothing is rounded to 16 bits before the product.
//
// Pipeline: a step is (kernel point k, corner c, chunk of kBK channels), chunks innermost; its
// operands (BM corner rows x kBK, BN weight rows x kBK) are one stage of a kCornerStages-deep
// cp.async ring, issued kCornerStages - 1 steps ahead, so that one barrier per step is the only
// synchronisation. The stencils of kernel point k (corner addresses and weights, per position) are
// built by thread tid < BM into one of kCornerSets buffers when the first stage of k - 1 is
// issued, from offsets and mask values loaded one kernel point earlier still.
//
// Conditions: those of implicit_gemm.cuh's forward (applies()), D <= 2, C_out/G <= 128, and each
// conv group's channels in one offset group (corner_applies()).
#pragma once

#include "implicit_gemm.cuh"

namespace dcnlab {
namespace implicit_gemm {

constexpr int kCornerStages = 4;  // cp.async ring depth
constexpr int kCornerSets = 4;    // stencil buffers: kernel points k - 2 .. k + 1 may be in use

// One kernel point's stencils, structure of arrays (a warp's reads of consecutive rows hit
// consecutive banks).
template <int D, int BM>
struct CornerPoints {
  const void* source[1 << D][BM];  // the corner's channel 0 of the block's conv group; null outside the input
  float weight[1 << D][BM];        // N-linear weight times the modulation (the modulation alone outside)
};

template <int D, int BM, int BN, int S>
struct alignas(128) CornerShared {
  static constexpr int kScratchLd = BM + 8;
  union {
    struct {
      __align__(16) uint16_t a[S][BM * kLd];  // corner rows, (position, channel)
      __align__(16) uint16_t b[S][BN * kLd];  // weight slice, (output channel, channel)
    } stages;
    __align__(16) uint16_t scratch[BN * kScratchLd];  // epilogue: (output channel, position)
  };
  CornerPoints<D, BM> points[kCornerSets];
  int64_t out_base[BM];  // b * C_out * L + l of each tile row, -1 past the end
  int64_t row_sample[BM];
  int64_t row_position[BM];
  int64_t row_origin[D][BM];
};

// Tiles: BM output positions x BN output channels, 8 warps of 32 x 32 ((BM / 32) x (BN / 32)).
template <int D, int BM, int BN, int S, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2)
    corner_forward_kernel(const ConvGeometry<D> geo, const scalar_t* __restrict__ input,
                          const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                          const scalar_t* __restrict__ weight_rows, const scalar_t* __restrict__ bias,
                          scalar_t* __restrict__ output) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kWarpsN = BN / 32;
  constexpr int kWarpsM = (kThreads / 32) / kWarpsN;
  constexpr int kTilesN = 4;  // n8 tiles per warp
  constexpr int kPacksPerRow = kBK / kPack;
  constexpr int kCorners = 1 << D;
  constexpr int kCopiesA = BM * kPacksPerRow / kThreads;
  constexpr int kCopiesB = BN * kPacksPerRow / kThreads;
  static_assert(kWarpsM * 32 == BM && BM <= kThreads, "warp tiles of 32 x 32, one stencil builder per row");
  static_assert(kCopiesA * kThreads == BM * kPacksPerRow && kCopiesB * kThreads == BN * kPacksPerRow, "copies");
  using Shared = CornerShared<D, BM, BN, S>;
  extern __shared__ __align__(128) unsigned char corner_shared[];
  auto& smem = *reinterpret_cast<Shared*>(corner_shared);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int warp_m = warp / kWarpsN;
  const int warp_n = warp % kWarpsN;
  const int64_t L = geo.out_plane;
  const int64_t M = geo.batch * L;
  const int64_t C = geo.in_channels;
  const int in_per_group = static_cast<int>(C / geo.groups);
  const int64_t per_offset_group = C / geo.offset_groups;
  const int64_t out_per_group = geo.out_channels / geo.groups;
  const int K = static_cast<int>(geo.kernel_points);
  const int64_t R = static_cast<int64_t>(in_per_group) * K;
  const int64_t tiles_n = (out_per_group + BN - 1) / BN;
  const int g = static_cast<int>(blockIdx.y / tiles_n);
  const int64_t n0 = (blockIdx.y % tiles_n) * BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int chunks = in_per_group / kBK;
  const int steps = K * kCorners * chunks;
  const int64_t og = static_cast<int64_t>(g) * in_per_group / per_offset_group;  // the group's one offset group

  // Thread tid < BM builds the stencils of tile row tid: its sample, position and origin.
  const bool row_valid = tid < BM && m0 + tid < M;
  if (tid < BM) {
    int64_t b = 0, l = 0, origin[D] = {};
    if (row_valid) {
      divide(m0 + tid, L, b, l);
      output_origin(geo, l, origin);
    }
    smem.out_base[tid] = row_valid ? b * geo.out_channels * L + l : -1;
    smem.row_sample[tid] = b;
    smem.row_position[tid] = l;
    for (int a = 0; a < D; ++a) smem.row_origin[a][tid] = origin[a];
  }

  // Stencil sets: kernel point k lives in points[k % kCornerSets]. raw holds the offsets and
  // modulation of this row at kernel point `built` (the next to build), coord that point's
  // kernel coordinates.
  float raw[D + 1] = {};
  int coord[D] = {};
  int built = 0;
  auto load_raw = [&]() {
    if (!row_valid || built >= K) return;
    const int64_t l = smem.row_position[tid];
    const int64_t row = (smem.row_sample[tid] * geo.offset_groups + og) * K + built;
    for (int a = 0; a < D; ++a) raw[a] = static_cast<float>(offset[(row * D + a) * L + l]);
    raw[D] = mask ? static_cast<float>(mask[row * L + l]) : 1.0f;
  };
  const scalar_t* group_input = input + static_cast<int64_t>(g) * in_per_group;
  // Builds kernel point `built` from raw, then loads the next one's raw values (tid < BM).
  auto build_next = [&]() {
    if (built >= K) return;
    CornerPoints<D, BM>& points = smem.points[built % kCornerSets];
    int64_t low[D] = {};
    float frac[D] = {};
    bool in_range = false;
    if (row_valid) {
      int64_t origin[D], displacement[D];
      for (int a = 0; a < D; ++a) {
        origin[a] = smem.row_origin[a][tid];
        displacement[a] = coord[a] * geo.dilation[a];
      }
      float pos[D];
      position_at(origin, displacement, raw, pos);
      in_range = stencil_cell(pos, geo.in_size, low, frac);
    }
    const float modulation = row_valid ? raw[D] : 0.0f;
    const int64_t sample_base = smem.row_sample[tid] * geo.in_plane;
    for (int corner = 0; corner < kCorners; ++corner) {
      int64_t index;
      float weight;
      const bool inside = stencil_corner(low, frac, geo.in_size, in_range, corner, index, weight);
      points.source[corner][tid] = inside ? group_input + (sample_base + index) * C : nullptr;
      // Outside corners are zero rows; their weight is the modulation alone, so that a
      // non-finite mask gives what the other paths give (modulation * 0).
      points.weight[corner][tid] = modulation * (inside ? weight : 1.0f);
    }
    for (int a = D - 1; a >= 0; --a) {
      if (++coord[a] < static_cast<int>(geo.kernel[a])) break;
      coord[a] = 0;
    }
    ++built;
    load_raw();
  };
  if (tid < BM) {
    load_raw();
    build_next();  // kernel point 0
  }
  __syncthreads();

  // Stage copies: this thread's weight sources at k = 0, c0 = 0 and its shared targets.
  const scalar_t* weight_source[kCopiesB];
  int weight_bytes[kCopiesB];
  for (int i = 0; i < kCopiesB; ++i) {
    const int p = tid + i * kThreads;
    const int64_t col = n0 + p / kPacksPerRow;
    const bool valid = col < out_per_group;
    // An invalid copy reads nothing (0 bytes) from a valid address: the first weight row.
    weight_source[i] = valid ? weight_rows + (g * out_per_group + col) * R + (p % kPacksPerRow) * kPack : weight_rows;
    weight_bytes[i] = valid ? 16 : 0;
  }
  // Corner rows through L1 (cp.async.ca): neighbouring positions share corners, and the chunks of
  // one row are one line.
  auto copy_cached_16 = [](void* shared, const void* global, int src_bytes) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(src_bytes));
  };
  // Issues the copies of step (k, corner, chunk) into stage `stage`; at the first step of k the
  // stencils of k + 1 are built (its first stage is issued at least two barriers later).
  auto issue = [&](int stage, int k, int corner, int chunk) {
    const CornerPoints<D, BM>& points = smem.points[k % kCornerSets];
    const int c0 = chunk * kBK;
    uint16_t* a_tile = smem.stages.a[stage];
    uint16_t* b_tile = smem.stages.b[stage];
    for (int i = 0; i < kCopiesA; ++i) {
      const int p = tid + i * kThreads;
      const int row = p / kPacksPerRow;
      const int channel = c0 + (p % kPacksPerRow) * kPack;
      const scalar_t* source = static_cast<const scalar_t*>(points.source[corner][row]);
      copy_cached_16(a_tile + row * kLd + (p % kPacksPerRow) * kPack, source ? source + channel : input,
                     source ? 16 : 0);
    }
    const int64_t weight_step = static_cast<int64_t>(k) * in_per_group + c0;
    for (int i = 0; i < kCopiesB; ++i) {
      const int p = tid + i * kThreads;
      copy_async_16(b_tile + (p / kPacksPerRow) * kLd + (p % kPacksPerRow) * kPack, weight_source[i] + weight_step,
                    weight_bytes[i]);
    }
    if (corner == 0 && chunk == 0 && tid < BM) build_next();
  };
  auto commit = [] {
    asm volatile("cp.async.commit_group;\n" ::);
  };

  // Prologue: stages 0 .. S - 2, a barrier after each (a stencil set built in one may be read by
  // the next).
  int issue_k = 0, issue_corner = 0, issue_chunk = 0;
  auto advance = [&](int& k, int& corner, int& chunk) {
    if (++chunk == chunks) {
      chunk = 0;
      if (++corner == kCorners) {
        corner = 0;
        ++k;
      }
    }
  };
  for (int s = 0; s < S - 1; ++s) {
    if (s < steps) {
      issue(s, issue_k, issue_corner, issue_chunk);
      advance(issue_k, issue_corner, issue_chunk);
    }
    commit();
    __syncthreads();
  }

  // ldmatrix lane addresses as in forward_kernel: A tiles (rows g / g + 8, k 0-7 / 8-15) in the
  // order a0..a3, B tiles (n 0-7 / 8-15 x k 0-7 / 8-15) as b0, b1 of n-tile j and of j + 1.
  const int a_row = warp_m * 32 + lane % 8 + 8 * ((lane / 8) % 2);
  const int a_col = 8 * (lane / 16);
  const int b_row = warp_n * 32 + lane % 8 + 8 * (lane / 16);
  const int b_col = 8 * ((lane / 8) % 2);
  const int group = lane / 4;
  const int pair = (lane % 4) * 2;
  float acc[2][kTilesN][4] = {};
  float partial[2][kTilesN][4] = {};
  int k = 0, corner = 0, chunk = 0;
  for (int s = 0; s < steps; ++s) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(S - 2));
    __syncthreads();  // stage s is complete for every thread, stage s - 1 is free
    if (s + S - 1 < steps) {
      issue((s + S - 1) % S, issue_k, issue_corner, issue_chunk);
      advance(issue_k, issue_corner, issue_chunk);
    }
    commit();
    const uint16_t* a_tile = smem.stages.a[s % S];
    const uint16_t* b_tile = smem.stages.b[s % S];
    for (int kk = 0; kk < kBK; kk += 16) {
      unsigned a[2][4];
      for (int f = 0; f < 2; ++f) load_matrix_x4(a[f], a_tile + (a_row + f * 16) * kLd + kk + a_col, false);
      for (int j = 0; j < kTilesN; j += 2) {
        unsigned b[4];
        load_matrix_x4(b, b_tile + (b_row + j * 8) * kLd + kk + b_col, false);
        for (int f = 0; f < 2; ++f) {
          mma_16816<scalar_t>(partial[f][j], a[f], b[0], b[1]);
          mma_16816<scalar_t>(partial[f][j + 1], a[f], b[2], b[3]);
        }
      }
    }
    if (chunk == chunks - 1) {
      // (k, corner) is complete: scale its rows by their corner weights into the output.
      const CornerPoints<D, BM>& points = smem.points[k % kCornerSets];
      for (int f = 0; f < 2; ++f) {
        for (int half = 0; half < 2; ++half) {
          const float w = points.weight[corner][warp_m * 32 + f * 16 + group + half * 8];
          for (int j = 0; j < kTilesN; ++j) {
            for (int e = 0; e < 2; ++e) {
              acc[f][j][2 * half + e] += w * partial[f][j][2 * half + e];
              partial[f][j][2 * half + e] = 0.0f;
            }
          }
        }
      }
    }
    advance(k, corner, chunk);
  }

  // Epilogue: bias in fp32, then (output channel, position) through shared memory so that the
  // writes run along positions.
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();  // the stages become the scratch
  constexpr int kScratchLd = Shared::kScratchLd;
  scalar_t* scratch = reinterpret_cast<scalar_t*>(smem.scratch);
  for (int j = 0; j < kTilesN; ++j) {
    for (int e = 0; e < 2; ++e) {
      const int col = warp_n * 32 + j * 8 + pair + e;
      const int64_t channel = n0 + col;
      const float shift = bias && channel < out_per_group ? static_cast<float>(bias[g * out_per_group + channel]) : 0.0f;
      for (int f = 0; f < 2; ++f) {
        for (int half = 0; half < 2; ++half) {
          const int row = warp_m * 32 + f * 16 + group + half * 8;
          scratch[col * kScratchLd + row] = static_cast<scalar_t>(acc[f][j][2 * half + e] + shift);
        }
      }
    }
  }
  __syncthreads();
  for (int e = tid; e < BN * BM; e += kThreads) {
    const int col = e / BM;
    const int row = e % BM;
    const int64_t base = smem.out_base[row];
    const int64_t channel = n0 + col;
    if (base >= 0 && channel < out_per_group) {
      output[base + (g * out_per_group + channel) * L] = scratch[col * kScratchLd + row];
    }
  }
#endif
}

// Whether the corner form takes a call that applies() admits to the fused forward.
// DCNLAB_FUSED_FORWARD=blend keeps implicit_gemm.cuh's kernel (for measurements).
template <int D>
bool corner_applies(const ConvGeometry<D>& geo) {
  static_assert(D <= 2, "3-D keeps the blend kernel: the corner form has 8x the dense product's tensor-core work");
  const char* variable = std::getenv("DCNLAB_FUSED_FORWARD");
  if (variable && std::string(variable) == "blend") return false;
  const int64_t in_per_group = geo.in_channels / geo.groups;
  return geo.out_channels / geo.groups <= 128 && geo.channels_per_offset_group() % in_per_group == 0;
}

template <int D, typename scalar_t>
void corner_forward(const ConvGeometry<D>& geo, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                    const scalar_t* weight_rows, const scalar_t* bias, scalar_t* output) {
  const int64_t out_per_group = geo.out_channels / geo.groups;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const char* stages_variable = std::getenv("DCNLAB_CORNER_STAGES");
  const int stages = stages_variable ? std::atoi(stages_variable) : kCornerStages;
  auto run = [&](auto block_m, auto block_n, auto ring) {
    constexpr int BM = decltype(block_m)::value;
    constexpr int BN = decltype(block_n)::value;
    constexpr int S = decltype(ring)::value;
    constexpr auto kernel = corner_forward_kernel<D, BM, BN, S, scalar_t>;
    constexpr int bytes = sizeof(CornerShared<D, BM, BN, S>);
    opt_in_shared_memory<kernel>(bytes);
    const int64_t m_tiles = (geo.batch * geo.out_plane + BM - 1) / BM;
    const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(geo.groups * ((out_per_group + BN - 1) / BN)));
    kernel<<<grid, kThreads, bytes, stream>>>(geo, input, offset, mask, weight_rows, bias, output);
  };
  auto run_stages = [&](auto block_m, auto block_n) {
    if (stages == 3) run(block_m, block_n, std::integral_constant<int, 3>());
    else if (stages == 5) run(block_m, block_n, std::integral_constant<int, 5>());
    else run(block_m, block_n, std::integral_constant<int, 4>());
  };
  // Two accumulators (output and partial) of BM x BN / 256 floats per thread: 64 x 128 or 128 x 64.
  if (out_per_group > 64) {
    run_stages(std::integral_constant<int, 64>(), std::integral_constant<int, 128>());
  } else {
    run_stages(std::integral_constant<int, 128>(), std::integral_constant<int, 64>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace implicit_gemm
}  // namespace dcnlab
