// Fused backward of the deformable convolution for half types: no column buffers.
//
// With columns (M = B*L, R) as in implicit_gemm.cuh and the grad output seen as (M, C_out/G) per
// conv group, the backward is
//   grad_weight_rows (C_out/G, R) = grad_out^T @ columns         (a reduction over positions)
//   grad_columns     (M, R)       = grad_out @ weight_rows       (a reduction over output channels)
// and the sampling gradients (input, offset, mask) are functions of each grad_columns element
// and the same interpolation corners the columns are made of.
//
// A block owns one (conv group, kernel point, chunk of CH = 32 or 64 input channels) and a strided set of
// BM-position tiles. For each tile it
//   1. copies the grad-output tile (BN output channels x BM positions) into shared memory and
//      builds the tile's stencils (one per position: this kernel point, the chunk's offset group),
//   2. computes the tile's grad columns (BM x CH, fp32) on tensor cores from the grad-output
//      tile and the block's weight slice (loaded once),
//   3. reads each (position, 8-channel pack)'s interpolation corners once and from them writes
//      the sampled, modulated columns into shared memory and computes the sampling gradients:
//      grad_input by one 16-byte vector atomic per 4 channels and corner into an fp32 buffer,
//      the offset and mask gradients summed over the pack's channels in registers and over the
//      chunk's CH / 8 lanes with shuffles,
//   4. accumulates grad_weight (BN x CH, fp32 fragments that stay in registers across tiles) on
//      tensor cores from the grad-output tile and the columns.
// Both products are mma.sync m16n8k16 with operands loaded by ldmatrix (the transposes by
// ldmatrix.trans). At the end each block adds its partial weight gradient (its positions' share)
// into one fp32 buffer with vector atomics, so its rounding can differ run to run (also when
// grad_input, itself accumulated with atomics, is not wanted); the path never runs under
// torch.use_deterministic_algorithms (backward_applies()), where the im2col backward keeps the
// weight gradient deterministic. The offset and mask gradients are written directly when an offset
// group is one chunk (CH channels); otherwise each chunk adds its channel sum with one fp32 atomic
// per (point, axis) into a buffer.
//
// Output channels come in tiles of BN (64 or 128). A layer with more than 128 per group sums the
// grad columns over its tiles, loading one grad-output tile and weight slice after the other into
// shared memory, and computes its weight gradient one tile per launch (backward() below).
//
// Conditions (backward_applies()): half types, sm_80 or newer, C_in/G and C_in/offset_groups
// multiples of 32, 16-byte aligned weight rows; not under deterministic algorithms (the
// grad_input atomics). By default only for at most 128 channels per group, input and output.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>

#include "atomics.cuh"
#include "bias_grad.cuh"
#include "implicit_gemm.cuh"
#include "layout_copy.cuh"

namespace dcnlab {
namespace implicit_gemm {

constexpr int kBackwardBM = 128;  // positions per tile: 8 warps x 16 rows
// fp32 elements of one chunk's grad_input buffer: the batch is split into chunks of samples so
// that the buffer stays below this. Measured on H200 (docs/perf-notes.md, v12): for B8 C64
// 128x128 the backward takes 0.639 / 0.671 / 0.724 ms at 8 / 4 / 2 Mi elements (1 / 2 / 4
// launches) with a 75 / 59 / 51 MiB peak; 4 Mi keeps the extra memory of a fwd+bwd under a
// quarter of torchvision's.
constexpr int64_t kGradInputBudget = int64_t(1) << 22;

// The tile's sample points (this kernel point, the chunk's offset group), one column per
// position: structure of arrays, so that a warp's reads of eight positions and the writes of
// consecutive positions hit consecutive banks.
template <int D>
struct TilePoints {
  static constexpr int kCorners = 1 << D;
  int64_t index[kCorners][kBackwardBM];  // element offset of the corner's channel 0 in the chunk's channels-last input, -1 outside
  float weight[kCorners][kBackwardBM];   // N-linear weight (0 outside)
  float frac[D][kBackwardBM];
  float modulation[kBackwardBM];
  int64_t mask_index[kBackwardBM];    // (b, offset group, k, l) in the mask seen as (B*G_off*K, L); -1 past the end
  int64_t offset_index[kBackwardBM];  // the same point's axis-0 element in the offset (B*G_off*K*D, L)
};

// Rows of 16-bit tiles are 8 elements longer than their data (272, and 80 or 144 bytes), which
// keeps the ldmatrix row addresses 16-byte aligned and their 8 rows on distinct bank groups. fp32
// grad-column rows of 64 channels are 8 floats longer (a row stride of 8 banks modulo 32: a warp's
// phase-2 fragment stores, 8 rows x 4 float2, take the 2 wavefronts their 256 bytes need; with 4
// they took 3.6 on average, docs/perf-notes.md, session 17), and their channels 32..63 sit 4 floats
// further on (grad_col()), so that the 8 lanes of a position reading 8 floats each at 32-byte steps
// hit 8 distinct bank groups (2-way before). Rows of 32 channels stay 4 floats longer: there a
// quarter-warp's 16-byte reads cover two rows, which a stride of 4 banks keeps conflict-free (8 would
// make them 2-way). CH channels per block.
template <int D, int BN, int CH>
struct alignas(128) BackwardShared {
  static constexpr int kLdChannels = CH + 8;
  static constexpr int kLdGrad = CH > 32 ? CH + 8 : CH + 4;
  static constexpr int kGradGap = CH > 32 ? 4 : 0;
  // Offset of channel c in a grad-column row (no 16-byte read or float2 write crosses channel 32).
  __host__ __device__ static constexpr int grad_col(int c) { return c + (c >= 32 ? kGradGap : 0); }
  __align__(32) uint16_t grad_out[BN * (kBackwardBM + 8)];  // (output channel, position)
  __align__(32) uint16_t weight[BN * kLdChannels];          // (output channel, channel)
  __align__(32) uint16_t columns[kBackwardBM * kLdChannels];  // (position, channel)
  __align__(32) float grad_columns[kBackwardBM * kLdGrad];  // (position, channel)
  TilePoints<D> points;
  int64_t next_walk;  // with a tile queue: the block's next walk, published by thread 0
};

// Pointers of one launch (a chunk of n samples starting at b0). Null: not wanted.
template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* input;        // channels-last, the chunk's first sample
  const scalar_t* offset;
  const scalar_t* mask;
  const scalar_t* weight_rows;  // (G, C_out/G, R)
  const scalar_t* grad_output;  // (B, C_out, L), whole batch
  int64_t b0, n;
  bool vector_grad_out;         // L % 8 == 0 and 16-byte aligned: 8-position copies
  float* grad_input;            // (n, *in, C_in) fp32, zeroed
  scalar_t* grad_offset;        // written directly (one chunk per offset group) ...
  scalar_t* grad_mask;
  float* grad_offset_sum;       // ... or summed over chunks with atomics (zeroed fp32)
  float* grad_mask_sum;
  float* grad_weight_part;      // (G, weight_part_rows, R) fp32, zeroed, that every block adds its partial sum to
  int64_t weight_part_rows;     // rows per group of grad_weight_part: the output tiles x BN
  // (launches x splits x bias_period, C_out) fp32: partial sums of the bias gradient, one row per
  // (launch, split, kernel point and chunk), this launch's first at row bias_row0; null: not wanted
  // (one tile of output channels only).
  float* bias_part;
  int64_t bias_row0;
  unsigned bias_period;  // K x the chunks of a conv group: the blocks that take turns per tile
  // Output channels in tiles of BN: the grad columns sum the products of tiles tile_begin ..
  // tile_begin + tile_count - 1 (one at a time through shared memory), the weight gradient is
  // that of the last of them.
  int tile_begin, tile_count;
  // The blocks of kernel point k start their walk over the position tiles k * tile_rotate tiles
  // further on (0: every kernel point walks the same tiles at the same time; see backward()).
  int64_t tile_rotate = 0;
  // Null: split s walks s, s + splits, ... Else one counter per blockIdx.x (conv group, kernel point,
  // chunk), zeroed: the blocks of a blockIdx.x take their walks from it one after the other, so a
  // block slowed by its neighbours takes fewer tiles instead of finishing last (see backward()).
  unsigned* tile_queue = nullptr;
};

// Whether a backward kernel computes the bias gradient (BackwardArgs::bias_part): one tile of output
// channels, and not the 128 x 64 tiles (the 1-D kernel), which sat at the register limit: there
// its 4 accumulators raised ptxas's spills from 16 to 64 bytes per thread and the kernel took 829
// instead of 801 us for B32 C128 4096 k9 on H200 (docs/perf-notes.md, session 10), more than the
// separate bias kernel it saves. Measured again once the grad-output copies freed registers
// (session 12): fwd+bwd 1077 -> 1073 us, within 0.4%, so the split stays.
template <int BN, int CH, bool kTiled>
constexpr bool fuses_bias() {
  return !kTiled && !(BN == 128 && CH == 64);
}

// kTiled: C_out/G > BN (tile_begin and tile_count are read); otherwise one tile of output channels, and the compiled kernel has none of the tile loop.
template <int D, int BN, int CH, bool kTiled, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2)
    backward_kernel(const ConvGeometry<D> geo, const BackwardArgs<scalar_t> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BM = kBackwardBM;
  constexpr int kLdOut = BM + 8;
  constexpr int kPacksPerRow = CH / kPack;
  constexpr int kCorners = TilePoints<D>::kCorners;
  // The weight gradient (BN x CH) in 16 x 8 tiles over 8 warps: 16 output channels x kTiles
  // tiles of 8 channels each.
  constexpr int kWarpsPerWeightRow = 128 / BN;          // warps sharing 16 output channels: 1 or 2
  constexpr int kTiles = (CH / 8) / kWarpsPerWeightRow;  // CH / 8 (BN = 128) or CH / 16 (BN = 64)
  static_assert(BM == 16 * (kThreads / 32) && (BN == 64 || BN == 128) && (CH == 32 || CH == 64), "tile shape");
  using Shared = BackwardShared<D, BN, CH>;
  constexpr int kLd = Shared::kLdChannels;
  constexpr int kLdGrad = Shared::kLdGrad;
  extern __shared__ __align__(128) unsigned char backward_shared[];
  auto& smem = *reinterpret_cast<Shared*>(backward_shared);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t L = geo.out_plane;
  const int64_t M = args.n * L;
  const int64_t C = geo.in_channels;
  const int64_t C_out = geo.out_channels;
  const int in_per_group = static_cast<int>(C / geo.groups);
  const int per_offset_group = static_cast<int>(C / geo.offset_groups);
  const int out_per_group = static_cast<int>(C_out / geo.groups);
  const int K = static_cast<int>(geo.kernel_points);
  const int64_t R = static_cast<int64_t>(in_per_group) * K;
  const int chunks = in_per_group / CH;
  const int chunk = blockIdx.x % chunks;
  const int k = (blockIdx.x / chunks) % K;
  const int g = blockIdx.x / (chunks * K);
  const int c0 = chunk * CH;
  const int64_t c_abs = static_cast<int64_t>(g) * in_per_group + c0;
  const int og = static_cast<int>(c_abs / per_offset_group);
  // Output channels of tile t that the products need to visit (whole 16-channel steps).
  auto tile_end = [&](int t) { return (min(BN, out_per_group - t * BN) + 15) / 16 * 16; };
  const int tile_begin = kTiled ? args.tile_begin : 0;
  const int last_tile = kTiled ? args.tile_begin + args.tile_count - 1 : 0;
  const scalar_t* zeros = reinterpret_cast<const scalar_t*>(zero_pack);
  const bool want_columns = args.grad_weight_part != nullptr;
  const bool want_position =
      args.grad_offset || args.grad_mask || args.grad_offset_sum || args.grad_mask_sum;
  const bool want_grad_columns = want_position || args.grad_input;

  // The weight slice of output-channel tile t (BN output channels x CH channels of kernel point k).
  auto load_weight = [&](int t) {
    for (int p = tid; p < BN * kPacksPerRow; p += kThreads) {
      const int co = p / kPacksPerRow;
      const int pack = p % kPacksPerRow;
      const int channel = t * BN + co;
      const bool valid = channel < out_per_group;
      const scalar_t* source =
          valid ? args.weight_rows + (static_cast<int64_t>(g) * out_per_group + channel) * R +
                      static_cast<int64_t>(k) * in_per_group + c0 + pack * kPack
                : args.weight_rows;
      copy_async_16(smem.weight + co * kLd + pack * kPack, source, valid ? 16 : 0);
    }
  };
  // The grad-output tile (BN output channels of tile t x BM positions from m0), zero past the end
  // and past out_per_group.
  auto load_grad_out = [&](int t, int64_t m0) {
    const int64_t channel0 = static_cast<int64_t>(g) * out_per_group + t * BN;
    const int count = min(BN, out_per_group - t * BN);
    if (args.vector_grad_out) {
      // Thread t always copies positions 8 (t % (BM / 8)) .. + 7 of the tile (one sample, as
      // L % 8 == 0), output channels t / (BM / 8) + i * kThreads / (BM / 8): one division per
      // tile, not one per copy (a 32-bit division and 64-bit address arithmetic per 16 bytes were
      // ~30% of the 1-D backward's instructions: docs/perf-notes.md, session 12).
      static_assert(kThreads % (BM / 8) == 0, "fixed positions per thread");
      constexpr int kRowsPerPass = kThreads / (BM / 8);
      const int q = tid % (BM / 8);
      const int64_t m = m0 + q * 8;
      int64_t b_local = 0, l = 0;
      if (m < M) divide(m, L, b_local, l);
      const scalar_t* source = args.grad_output + ((args.b0 + b_local) * C_out + channel0) * L + l;
      uint16_t* target = smem.grad_out + q * 8;
      for (int co = tid / (BM / 8); co < BN; co += kRowsPerPass) {
        // An invalid copy reads nothing (0 bytes) from a valid address.
        const bool valid = co < count && m < M;
        copy_async_16(target + co * kLdOut, valid ? source + static_cast<int64_t>(co) * L : args.grad_output,
                      valid ? 16 : 0);
      }
    } else {
      // Thread t always covers position t % BM of the tile, output channels t / BM + i * kThreads / BM.
      static_assert(kThreads % BM == 0, "fixed position per thread");
      scalar_t* target = reinterpret_cast<scalar_t*>(smem.grad_out);
      const int r = tid % BM;
      const int64_t m = m0 + r;
      int64_t b_local = 0, l = 0;
      if (m < M) divide(m, L, b_local, l);
      const int64_t base = m < M ? ((args.b0 + b_local) * C_out + channel0) * L + l : -1;
      for (int co = tid / BM; co < BN; co += kThreads / BM) {
        target[co * kLdOut + r] = base >= 0 && co < count ? args.grad_output[base + co * L] : scalar_t(0);
      }
    }
  };
  // With one tile of output channels the weight slice is copied once per block (its copies
  // complete with the first position tile's); with several, once per tile and position tile.
  if constexpr (!kTiled) {
    if (want_grad_columns) load_weight(0);
  }

  // Lane roles in the fragments (see mma_16816) and in the ldmatrix addresses (lane / 8 picks one of
  // the four 8x8 tiles, lane % 8 its row).
  const int lane = tid % 32;
  const int group = lane / 4;
  const int pair = (lane % 4) * 2;
  const int quad = lane / 8;
  const int quad_row = lane % 8;
  const int weight_row = (warp / kWarpsPerWeightRow) * 16;            // first output channel of this warp
  const int weight_col = (warp % kWarpsPerWeightRow) * kTiles * 8;    // first channel of this warp
  float* weight_part = args.grad_weight_part
                           ? args.grad_weight_part + (g * args.weight_part_rows + int64_t(last_tile) * BN) * R +
                                 static_cast<int64_t>(k) * in_per_group + c0
                           : nullptr;
  float weight_acc[kTiles][4] = {};
  const int64_t split_index = blockIdx.y;
  // The bias gradient: the tiles are dealt out in turn to the conv group's (kernel point, chunk)
  // blocks, and the block whose turn it is adds grad-output tile @ ones to bias_acc in the
  // weight-gradient product (rows weight_row + group and + 8 of the fragment; one warp per 16
  // output channels). Fixed tiles and order per block: deterministic.
  const bool bias_warp = fuses_bias<BN, CH, kTiled>() && args.bias_part != nullptr && weight_col == 0;
  const unsigned bias_turn = blockIdx.x % args.bias_period;  // bias_period >= 1
  constexpr unsigned kOnes = std::is_same_v<scalar_t, c10::BFloat16> ? 0x3f803f80u : 0x3c003c00u;  // (1, 1)
  float bias_acc[4] = {};

  const int64_t tiles = (M + BM - 1) / BM;
  const int64_t rotation = args.tile_rotate > 0 ? (static_cast<int64_t>(k) * args.tile_rotate) % tiles : 0;
  // With a tile queue thread 0 fetches the block's next walk while the block works on the current
  // one and publishes it at the tile's end (the loop's first barrier makes it visible).
  unsigned* const queue = args.tile_queue ? args.tile_queue + blockIdx.x : nullptr;
  if (queue && tid == 0) smem.next_walk = atomicAdd(queue, 1u);
  bool any_tile = false;  // a block that took none adds nothing to the weight gradient
  for (int64_t walk = blockIdx.y;; walk += gridDim.y) {
    __syncthreads();  // the previous tile is consumed (and the next walk published)
    if (queue) walk = smem.next_walk;
    if (walk >= tiles) break;
    any_tile = true;
    const unsigned fetched = queue && tid == 0 ? atomicAdd(queue, 1u) : 0u;
    const int64_t tile = walk + rotation < tiles ? walk + rotation : walk + rotation - tiles;
    const int64_t m0 = tile * BM;
    // 1. Grad-output tile (the first output-channel tile of the launch) and, with several
    // tiles, its weight slice.
    load_grad_out(tile_begin, m0);
    if constexpr (kTiled) {
      if (want_grad_columns) load_weight(tile_begin);
    }
    // Stencils of the tile's positions at kernel point k, offset group og.
    if (tid < BM) {
      TilePoints<D>& points = smem.points;
      const int64_t m = m0 + tid;
      Stencil<D, float> stencil;
      float modulation = 0;
      if (m < M) {
        int64_t b_local, l, origin[D], displacement[D];
        divide(m, L, b_local, l);
        output_origin(geo, l, origin);
        kernel_displacement(geo, k, displacement);
        const int64_t row = point_row(geo, args.b0 + b_local, og, k);
        float raw[D];
        for (int a = 0; a < D; ++a) raw[a] = static_cast<float>(args.offset[(row * D + a) * L + l]);
        stencil_at(geo, origin, displacement, raw, stencil);
        modulation = args.mask ? static_cast<float>(args.mask[row * L + l]) : 1.0f;
        points.mask_index[tid] = row * L + l;
        points.offset_index[tid] = row * D * L + l;
        for (int corner = 0; corner < kCorners; ++corner) {
          points.index[corner][tid] =
              stencil.inside[corner] ? (b_local * geo.in_plane + stencil.index[corner]) * C : -1;
          points.weight[corner][tid] = stencil.weight[corner];
        }
        for (int a = 0; a < D; ++a) points.frac[a][tid] = stencil.frac[a];
      } else {
        points.mask_index[tid] = -1;
        points.offset_index[tid] = -1;
        for (int corner = 0; corner < kCorners; ++corner) {
          points.index[corner][tid] = -1;
          points.weight[corner][tid] = 0;
        }
        for (int a = 0; a < D; ++a) points.frac[a][tid] = 0;
      }
      points.modulation[tid] = modulation;
    }
    copy_async_wait_all();
    __syncthreads();

    // 2. Grad columns (BM x CH) = grad-output tile^T (BM x BN) @ weight slice (BN x CH); warp w
    // owns rows 16w..16w+15.
    if (want_grad_columns) {
      // Warp w owns rows 16w..16w+15 of the grad columns in shared memory, so each tile's
      // product is added there without a barrier; no accumulator lives across a tile's copies.
      for (int t = tile_begin; t <= last_tile; ++t) {
        if (kTiled && t > tile_begin) {  // the next output-channel tile replaces this one
          __syncthreads();
          load_grad_out(t, m0);
          load_weight(t);
          copy_async_wait_all();
          __syncthreads();
        }
        float grad_acc[CH / 8][4] = {};
        const int out_end = tile_end(t);
        for (int co0 = 0; co0 < out_end; co0 += 16) {
          // A (positions x output channels) is the transpose of the stored tile.
          unsigned a[4];
          load_matrix_x4(a, smem.grad_out + (co0 + quad_row + 8 * (quad / 2)) * kLdOut + warp * 16 + 8 * (quad % 2),
                         true);
          for (int n = 0; n < CH / 8; n += 2) {
            unsigned b[4];
            load_matrix_x4(b, smem.weight + (co0 + quad_row + 8 * (quad % 2)) * kLd + n * 8 + 8 * (quad / 2), true);
            mma_16816<scalar_t>(grad_acc[n], a, b[0], b[1]);
            mma_16816<scalar_t>(grad_acc[n + 1], a, b[2], b[3]);
          }
        }
        for (int n = 0; n < CH / 8; ++n) {
          for (int half = 0; half < 2; ++half) {
            float2* target = reinterpret_cast<float2*>(smem.grad_columns + (warp * 16 + group + half * 8) * kLdGrad +
                                                       Shared::grad_col(n * 8 + pair));
            float2 value = make_float2(grad_acc[n][2 * half], grad_acc[n][2 * half + 1]);
            if (kTiled && t > tile_begin) {
              const float2 sum = *target;
              value.x += sum.x;
              value.y += sum.y;
            }
            *target = value;
          }
        }
      }
    }
    __syncthreads();

    // 3. One read of each (position, pack)'s corners: the columns and the sampling gradients.
    // Every thread runs BM * (CH / 8) / kThreads = 2 or 4 iterations (the shuffles need whole
    // warps); the CH / 8 packs of a position are consecutive lanes.
    static_assert(BM * kPacksPerRow % kThreads == 0, "whole warps in the shuffles");
    constexpr int kIterations = BM * kPacksPerRow / kThreads;
    const int pack = tid % kPacksPerRow;
    const TilePoints<D>& points = smem.points;
    const int64_t channel = c_abs + pack * kPack;
    // The corners of an iteration's (position, pack) as raw 16-byte bits. In 1-D and 2-D the next
    // iteration's are loaded before this one's reductions, which ptxas does not move loads across:
    // kernel 1.3% (B8 C64 128x128) and 2.7% (B32 C128 4096 k9) faster on H200 (docs/perf-notes.md,
    // session 17). 3-D would need 32 more registers, and the kernels over several output tiles
    // spill with it (8-16 bytes): not done there.
    constexpr bool kPrefetchCorners = D <= 2 && !kTiled;
    auto load_corners = [&](int iteration, uint4 (&bits)[kCorners]) {
      const int row = (tid + iteration * kThreads) / kPacksPerRow;
      for (int corner = 0; corner < kCorners; ++corner) {
        const int64_t index = points.index[corner][row];
        bits[corner] = __ldg(reinterpret_cast<const uint4*>(index >= 0 ? args.input + index + channel : zeros));
      }
    };
    uint4 next_corners[kCorners];
    if constexpr (kPrefetchCorners) load_corners(0, next_corners);
#pragma unroll
    for (int iteration = 0; iteration < kIterations; ++iteration) {
      const int row = (tid + iteration * kThreads) / kPacksPerRow;
      float weights[kCorners];
      uint4 corners[kCorners];
      if constexpr (kPrefetchCorners) {
        for (int corner = 0; corner < kCorners; ++corner) corners[corner] = next_corners[corner];
        if (iteration + 1 < kIterations) load_corners(iteration + 1, next_corners);
      } else {
        load_corners(iteration, corners);
      }
      for (int corner = 0; corner < kCorners; ++corner) weights[corner] = points.weight[corner][row];
      const float modulation = points.modulation[row];
      if (want_columns) {
        float values[kPack] = {};
        for (int corner = 0; corner < kCorners; ++corner) {
          accumulate_pack<scalar_t>(values, weights[corner], corners[corner]);
        }
        Pack<scalar_t, kPack> out;
        for (int v = 0; v < kPack; ++v) out.v[v] = static_cast<scalar_t>(modulation * values[v]);
        *reinterpret_cast<Pack<scalar_t, kPack>*>(smem.columns + row * kLd + pack * kPack) = out;
      }
      if (!want_grad_columns) continue;
      float grad[kPack];
      {
        const float* source = smem.grad_columns + row * kLdGrad;
        const float4 low = *reinterpret_cast<const float4*>(source + Shared::grad_col(pack * kPack));
        const float4 high = *reinterpret_cast<const float4*>(source + Shared::grad_col(pack * kPack + 4));
        grad[0] = low.x, grad[1] = low.y, grad[2] = low.z, grad[3] = low.w;
        grad[4] = high.x, grad[5] = high.y, grad[6] = high.z, grad[7] = high.w;
      }
      if (args.grad_input) {
        // The lanes of a position add channels 4*pack..4*pack+3 and CH/2+4*pack..CH/2+4*pack+3 (not
        // their own gather pack), so that each of the two vector atomics of a corner covers CH/2
        // contiguous channels across the lanes: whole 32-byte sectors, not half-used ones.
        float scatter[kPack];
        {
          const float* source = smem.grad_columns + row * kLdGrad;
          const float4 low = *reinterpret_cast<const float4*>(source + Shared::grad_col(pack * 4));
          const float4 high = *reinterpret_cast<const float4*>(source + Shared::grad_col(CH / 2 + pack * 4));
          scatter[0] = low.x, scatter[1] = low.y, scatter[2] = low.z, scatter[3] = low.w;
          scatter[4] = high.x, scatter[5] = high.y, scatter[6] = high.z, scatter[7] = high.w;
        }
        for (int corner = 0; corner < kCorners; ++corner) {
          const int64_t index = points.index[corner][row];
          if (index < 0) continue;
          const float scale = modulation * weights[corner];
          float* target = args.grad_input + index + c_abs + pack * 4;
          const float low[4] = {scatter[0] * scale, scatter[1] * scale, scatter[2] * scale, scatter[3] * scale};
          const float high[4] = {scatter[4] * scale, scatter[5] * scale, scatter[6] * scale, scatter[7] * scale};
          atomic_add_pack<4>(target, low);
          atomic_add_pack<4>(target + CH / 2, high);
        }
      }
      if (!want_position) continue;
      // sum_v grad[v] * x_corner[v] per corner gives both position gradients (slopes) and the
      // mask gradient (weights) without a per-channel loop over axes.
      float frac[D];
      for (int a = 0; a < D; ++a) frac[a] = points.frac[a][row];
      float grad_pos[D] = {};
      float grad_mod = 0;
      for (int corner = 0; corner < kCorners; ++corner) {
        float x[kPack];
        widen_bits<scalar_t, kPack>(corners[corner], x);
        float dot = 0;
        for (int v = 0; v < kPack; ++v) dot += grad[v] * x[v];
        grad_mod += weights[corner] * dot;
        for (int a = 0; a < D; ++a) grad_pos[a] += corner_slope<D, float>(frac, corner, a) * dot;
      }
      for (int delta = 1; delta < kPacksPerRow; delta *= 2) {
        for (int a = 0; a < D; ++a) grad_pos[a] += __shfl_xor_sync(0xffffffffu, grad_pos[a], delta);
        grad_mod += __shfl_xor_sync(0xffffffffu, grad_mod, delta);
      }
      const int64_t mask_index = points.mask_index[row];
      const int64_t offset_index = points.offset_index[row];
      if (pack == 0 && mask_index >= 0) {
        if (args.grad_offset) {
          for (int a = 0; a < D; ++a) args.grad_offset[offset_index + a * L] = static_cast<scalar_t>(modulation * grad_pos[a]);
        }
        if (args.grad_mask) args.grad_mask[mask_index] = static_cast<scalar_t>(grad_mod);
        if (args.grad_offset_sum) {
          for (int a = 0; a < D; ++a) atomicAdd(args.grad_offset_sum + offset_index + a * L, modulation * grad_pos[a]);
        }
        if (args.grad_mask_sum) atomicAdd(args.grad_mask_sum + mask_index, grad_mod);
      }
    }
    __syncthreads();

    // 4. Weight gradient += grad-output tile (BN x BM) @ columns (BM x CH).
    if (want_columns && weight_row < tile_end(last_tile)) {
      // Unrotated, a split's i-th tile goes to turn i % bias_period (the blocks of a split walk the
      // same tiles): every turn of a split gets its share. Rotated walks or a tile queue give the
      // blocks of a split different tiles, so the turn is then tile % bias_period: one block per
      // tile either way.
      const int64_t turn_key = args.tile_rotate > 0 || queue ? tile : walk / gridDim.y;
      const bool bias_tile = bias_warp && static_cast<unsigned>(turn_key % args.bias_period) == bias_turn;
      for (int p0 = 0; p0 < BM; p0 += 16) {
        unsigned a[4];
        load_matrix_x4(a, smem.grad_out + (weight_row + quad_row + 8 * (quad % 2)) * kLdOut + p0 + 8 * (quad / 2), false);
        if (bias_tile) mma_16816<scalar_t>(bias_acc, a, kOnes, kOnes);
        for (int n = 0; n < kTiles; n += 2) {
          unsigned b[4];
          load_matrix_x4(b, smem.columns + (p0 + quad_row + 8 * (quad % 2)) * kLd + weight_col + n * 8 + 8 * (quad / 2),
                         true);
          mma_16816<scalar_t>(weight_acc[n], a, b[0], b[1]);
          mma_16816<scalar_t>(weight_acc[n + 1], a, b[2], b[3]);
        }
      }
    }
    // Every thread read next_walk before this tile's barriers.
    if (queue && tid == 0) smem.next_walk = fetched;
  }
  copy_async_wait_all();  // a block without tiles still issued the weight-slice copies
  if (bias_warp && lane % 4 == 0) {
    float* row = args.bias_part + (args.bias_row0 + split_index * args.bias_period + bias_turn) * C_out +
                 static_cast<int64_t>(g) * out_per_group;
    for (int half = 0; half < 2; ++half) {
      const int co = weight_row + group + half * 8;
      if (co < out_per_group) row[co] = bias_acc[2 * half];
    }
  }
  if (want_columns && any_tile) {
    for (int n = 0; n < kTiles; ++n) {
      for (int half = 0; half < 2; ++half) {
        float2* target =
            reinterpret_cast<float2*>(weight_part + (weight_row + group + half * 8) * R + weight_col + n * 8 + pair);
        atomic_add_pair(target, make_float2(weight_acc[n][2 * half], weight_acc[n][2 * half + 1]));
      }
    }
  }
#endif
}

template <int D, int BN, int CH, bool kTiled, typename scalar_t>
int backward_blocks_per_sm() {
  return opt_in_shared_memory<backward_kernel<D, BN, CH, kTiled, scalar_t>>(
      static_cast<int>(sizeof(BackwardShared<D, BN, CH>)));
}

// Splits of the positions for blocks_x blocks per split, over `tiles` position tiles. Every block
// of a split runs ceil(tiles / splits) tiles and the blocks run in waves of `wave` resident
// blocks, so the time goes with waves(splits) * ceil(tiles / splits). More splits are taken only
// for a product at least 3% smaller: a block's fixed costs (weight slice, the atomics of its
// partial weight gradient) are paid once per split.
inline int64_t choose_splits(int64_t blocks_x, int64_t wave, int64_t tiles) {
  const int64_t limit = std::min<int64_t>({tiles, 65535, std::max<int64_t>(1, 16 * wave / blocks_x)});
  int64_t best = 1;
  int64_t best_cost = -1;
  for (int64_t splits = 1; splits <= limit; ++splits) {
    const int64_t waves = (blocks_x * splits + wave - 1) / wave;
    const int64_t cost = waves * ((tiles + splits - 1) / splits);
    if (best_cost < 0 || cost * 100 < best_cost * 97) {
      best = splits;
      best_cost = cost;
    }
  }
  return best;
}

// Whether the fused backward handles this call (the im2col backward otherwise). `input` is the
// op's input in any layout: each launch copies its samples to channels-last (or takes a view of a
// channels-last input).
template <int D>
bool backward_applies(const ConvGeometry<D>& geo, const at::Tensor& input, const at::Tensor& weight_rows) {
  if (at::globalContext().deterministicAlgorithms()) return false;  // grad_input needs atomics
  const std::string path = requested_path();
  if (path == "im2col") return false;
  const int64_t in_per_group = geo.in_channels / geo.groups;
  // Measured on H200 (docs/perf-notes.md, v11e): 1.5-2.4x faster than the im2col backward for
  // C_out/G = 32 and 64, on par for 128 (1D, with a third of the memory). Wider layers loop over
  // tiles of 128 output channels (DCNLAB_CUDA_PATH=fused).
  const bool wide = in_per_group > kMaxFusedChannels || geo.out_channels / geo.groups > kMaxFusedChannels;
  if (wide && path != "fused") return false;
  return fusable(geo, input, weight_rows) &&
         in_per_group * geo.kernel_points < (int64_t(1) << 31) &&  // R: a fragment's leading dimension
         geo.groups * geo.kernel_points * (in_per_group / kBK) < (int64_t(1) << 31);
}

// The fused backward; grad_input, grad_offset and grad_mask are the op's results (written
// here where wanted, each a defined tensor of its final shape), grad_weight_rows receives the
// (G, C_out/G, R) fp32 weight gradient where wanted, and grad_bias the bias gradient (in the
// input's dtype) where wanted and C_out/G fits one tile; it stays undefined otherwise.
//
// Each launch covers the samples whose fp32 grad_input buffer fits kGradInputBudget, with its own
// channels-last copy of those samples' input. With one tile of output channels (C_out/G <= 128)
// one launch computes every gradient. Wider layers sum the grad columns over all tiles of 128
// output channels in one launch (the sampling gradients need the whole sum) and compute the weight
// gradient one output tile per launch: the last tile with the sampling gradients, the others in
// launches that only gather the columns. Either way every block adds its partial weight gradient
// into one fp32 buffer with atomics, so the workspace does not grow with the position splits.
template <int D, typename scalar_t>
void backward(const ConvGeometry<D>& geo, const at::Tensor& input, const at::Tensor& offset,
              const std::optional<at::Tensor>& mask, const at::Tensor& weight_rows, const at::Tensor& grad_output,
              bool need_input, bool need_offset, bool need_mask, bool need_weight, bool need_bias,
              at::Tensor& grad_input, at::Tensor& grad_offset, at::Tensor& grad_mask, at::Tensor& grad_weight_rows,
              at::Tensor& grad_bias) {
  const int64_t out_per_group = geo.out_channels / geo.groups;
  const int64_t in_per_group = geo.in_channels / geo.groups;
  const int64_t R = in_per_group * geo.kernel_points;
  const auto options = input.options().dtype(at::kFloat);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const driver_detail::Layout<D, layout_copy::ChannelsLast> layout(geo);

  // Channels per block: 64 where the group and offset group allow it, which halves the
  // grad-output tile loads and lets a 64-channel offset group be one chunk; 32 otherwise. With
  // 128 output channels the 64-channel kernel spills registers; measured on H200 (docs/perf-notes.md,
  // v12): 17% faster for 1D (B32 C128 4096 k9), 10% slower in 2D and 3D, so only 1D takes it,
  // where the card lets a block have its 112 KiB of shared memory (not sm_86/sm_89: 99 KiB).
  const int64_t per_offset_group = geo.channels_per_offset_group();
  const bool wide_chunks =
      out_per_group <= 64 ||
      (D == 1 && at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin >= sizeof(BackwardShared<1, 128, 64>));
  const int chunk_channels = wide_chunks && in_per_group % 64 == 0 && per_offset_group % 64 == 0 ? 64 : kBK;
  // Offset and mask gradients: direct when an offset group is one chunk, else summed in fp32.
  const bool direct = per_offset_group == chunk_channels;
  at::Tensor offset_sum, mask_sum;
  if (need_offset && !direct) offset_sum = at::zeros(offset.sizes(), options);
  if (need_mask && !direct) mask_sum = at::zeros(mask->sizes(), options);
  const bool need_sampling = need_input || need_offset || need_mask;

  const int64_t per_sample = geo.in_plane * geo.in_channels;
  // Samples per launch: as many as the grad_input buffer budget allows, spread evenly.
  const int64_t chunk = need_input ? driver_detail::even_chunk(geo.batch, per_sample, kGradInputBudget) : geo.batch;
  const at::Tensor grad_input_buffer = need_input ? layout.grad_input_buffer(chunk, geo, options) : at::Tensor();

  auto run = [&](auto kernel, int block_n, int shared_bytes, int blocks_per_sm, bool kernel_sums_bias) {
    const int out_tiles = static_cast<int>((out_per_group + block_n - 1) / block_n);
    // Splits over positions.
    const int64_t blocks_x = geo.groups * geo.kernel_points * (in_per_group / chunk_channels);
    const int64_t wave = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * int64_t(blocks_per_sm);
    const int64_t tiles = (chunk * geo.out_plane + kBackwardBM - 1) / kBackwardBM;
    // Tile queues (BackwardArgs::tile_queue): the blocks of a (group, kernel point, chunk) take
    // tiles from its counter as they finish the last, instead of ceil(tiles / splits) fixed tiles
    // each, and there are about two waves of blocks: those that start after the first wave help
    // the counters that still have tiles (and leave at once where none are left), so no SM waits
    // for the slowest kernel point. DCNLAB_BWD_QUEUE=0 / 1 turns them off / on, DCNLAB_BWD_QUEUE_WAVES=n
    // launches n waves' worth of blocks instead of 2 (A/B timing). Measured on H200 (docs/perf-notes.md,
    // session 18): 1 wave is 3.5-4% slower than 2 in 3-D; 4 waves 0.8-1.6% faster in 3-D (not yet the
    // default: the GPU tests ran with 2), and about equal in 1-D and 2-D.
    const bool queued = !env_is("DCNLAB_BWD_QUEUE", "0");
    const char* waves_variable = std::getenv("DCNLAB_BWD_QUEUE_WAVES");
    const int64_t queue_waves = waves_variable ? std::max(1, std::atoi(waves_variable)) : 2;
    const int64_t splits = queued ? std::min<int64_t>({tiles, 65535, queue_waves * ((wave + blocks_x - 1) / blocks_x)})
                                  : choose_splits(blocks_x, wave, tiles);
    const int64_t launches = (geo.batch + chunk - 1) / chunk;
    // One set of counters per launch: per chunk of samples, out_tiles launches at most (the
    // weight-only launches of tiles 0 .. out_tiles - 2 and the sampling launch, which takes the last).
    at::Tensor queue;
    if (queued) queue = at::zeros({launches, out_tiles, blocks_x}, input.options().dtype(at::kInt));
    auto queue_of = [&](int64_t b0, int t) -> unsigned* {
      if (!queued) return nullptr;
      return reinterpret_cast<unsigned*>(queue.mutable_data_ptr<int>()) + ((b0 / chunk) * out_tiles + t) * blocks_x;
    };
    const int64_t weight_rows_per_group = int64_t(out_tiles) * block_n;
    at::Tensor weight_part;
    if (need_weight) weight_part = at::zeros({geo.groups, weight_rows_per_group, R}, options);
    // The bias gradient in the weight-gradient product where the kernel has it (fuses_bias()).
    const bool fused_bias = need_bias && need_weight && kernel_sums_bias;
    const int64_t bias_period = geo.kernel_points * (in_per_group / chunk_channels);
    at::Tensor bias_part;
    if (fused_bias) bias_part = at::empty({launches * splits * bias_period, geo.out_channels}, options);
    // Walks rotated by kernel point: the blocks of the K kernel points then work on tiles about
    // tiles / K apart instead of all on the same ones at once (whose grad_input reductions go to
    // neighbouring pixels). Measured on H200 (docs/perf-notes.md, session 17): the 2-D kernel 2.4%
    // faster (B8 C64 128x128), 1-D unchanged, 3-D unchanged for B4 C64 32^3 and 5% slower for B2 C32
    // 64^3, so 1-D and 2-D only. DCNLAB_BWD_ROTATE=0 / 1 turns it off / on (A/B timing; the
    // gradients then differ in the order of their fp32 sums); unset or any other value, the default.
    const bool rotate = env_is("DCNLAB_BWD_ROTATE", "1") || (D <= 2 && !env_is("DCNLAB_BWD_ROTATE", "0"));
    const int64_t tile_rotate = rotate ? std::max<int64_t>(1, tiles / geo.kernel_points) : 0;
    const bool vector_grad_out =
        geo.out_plane % 8 == 0 && reinterpret_cast<uintptr_t>(grad_output.const_data_ptr()) % 16 == 0;
    auto launch = [&](const BackwardArgs<scalar_t>& args) {
      kernel<<<dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(splits)), kThreads, shared_bytes, stream>>>(
          geo, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    for (int64_t b0 = 0; b0 < geo.batch; b0 += chunk) {
      const int64_t n = std::min(chunk, geo.batch - b0);
      at::Tensor input_chunk = layout_copy::to_channels_last(input.narrow(0, b0, n));
      // A view of a channels-last chunk keeps the caller's pointer (fusable() checks it for the
      // whole input only: a one-sample chunk can be channels-last where the input is not).
      if (reinterpret_cast<uintptr_t>(input_chunk.const_data_ptr()) % 16 != 0) input_chunk = input_chunk.clone();
      if (need_input) layout_copy::zero(grad_input_buffer.narrow(0, 0, n));
      const BackwardArgs<scalar_t> columns_only{input_chunk.const_data_ptr<scalar_t>(),
                                                offset.const_data_ptr<scalar_t>(),
                                                mask ? mask->const_data_ptr<scalar_t>() : nullptr,
                                                weight_rows.const_data_ptr<scalar_t>(),
                                                grad_output.const_data_ptr<scalar_t>(),
                                                b0,
                                                n,
                                                vector_grad_out,
                                                nullptr,
                                                nullptr,
                                                nullptr,
                                                nullptr,
                                                nullptr,
                                                need_weight ? weight_part.mutable_data_ptr<float>() : nullptr,
                                                weight_rows_per_group,
                                                fused_bias ? bias_part.mutable_data_ptr<float>() : nullptr,
                                                (b0 / chunk) * splits * bias_period,
                                                static_cast<unsigned>(bias_period),
                                                0,
                                                1,
                                                tile_rotate};
      // Weight-only launches for every output tile but the last, which the sampling launch takes.
      const int weight_only = need_weight ? (need_sampling ? out_tiles - 1 : out_tiles) : 0;
      for (int t = 0; t < weight_only; ++t) {
        BackwardArgs<scalar_t> args = columns_only;
        args.tile_begin = t;
        args.tile_queue = queue_of(b0, t);
        launch(args);
      }
      if (need_sampling) {
        BackwardArgs<scalar_t> args = columns_only;
        args.grad_input = need_input ? grad_input_buffer.mutable_data_ptr<float>() : nullptr;
        args.grad_offset = need_offset && direct ? grad_offset.mutable_data_ptr<scalar_t>() : nullptr;
        args.grad_mask = need_mask && direct ? grad_mask.mutable_data_ptr<scalar_t>() : nullptr;
        args.grad_offset_sum = offset_sum.defined() ? offset_sum.mutable_data_ptr<float>() : nullptr;
        args.grad_mask_sum = mask_sum.defined() ? mask_sum.mutable_data_ptr<float>() : nullptr;
        args.tile_count = out_tiles;
        args.tile_queue = queue_of(b0, out_tiles - 1);
        launch(args);
      }
      if (need_input) layout.store_grad_input(grad_input, b0, n, grad_input_buffer);
    }
    if (need_weight) {
      grad_weight_rows =
          weight_rows_per_group == out_per_group ? weight_part : weight_part.narrow(1, 0, out_per_group).contiguous();
    }
    if (fused_bias) grad_bias = bias_grad::sum_partials(bias_part, input.scalar_type());
  };
  // One kernel per (BN, CH), and its tiled form for more than 128 output channels per group.
  auto pick = [&](auto block_n, auto channels) {
    constexpr int BN = decltype(block_n)::value;
    constexpr int CH = decltype(channels)::value;
    constexpr int bytes = sizeof(BackwardShared<D, BN, CH>);
    if constexpr (BN == 128) {
      if (out_per_group > BN) {
        run(backward_kernel<D, BN, CH, true, scalar_t>, BN, bytes, backward_blocks_per_sm<D, BN, CH, true, scalar_t>(),
            false);
        return;
      }
    }
    run(backward_kernel<D, BN, CH, false, scalar_t>, BN, bytes, backward_blocks_per_sm<D, BN, CH, false, scalar_t>(),
        fuses_bias<BN, CH, false>());
  };
  using I64 = std::integral_constant<int, 64>;
  using I128 = std::integral_constant<int, 128>;
  using I32 = std::integral_constant<int, 32>;
  if (out_per_group > 64 && chunk_channels == 64) {
    if constexpr (D == 1) {  // only 1D takes it (chunk_channels above)
      pick(I128(), I64());
    } else {
      TORCH_CHECK(false, "dcnlab: internal error: 64-channel chunks with 128 output channels are 1-D only");
    }
  } else if (out_per_group > 64) {
    pick(I128(), I32());
  } else if (chunk_channels == 64) {
    pick(I64(), I64());
  } else {
    pick(I64(), I32());
  }
  if (offset_sum.defined()) grad_offset.copy_(offset_sum);
  if (mask_sum.defined()) grad_mask.copy_(mask_sum);
}

}  // namespace implicit_gemm
}  // namespace dcnlab
