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

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "../deform_conv_driver.h"
#include "atomics.cuh"
#include "bias_grad.cuh"
#include "implicit_gemm.cuh"
#include "implicit_gemm_backward.cuh"
#include "layout_copy.cuh"

namespace dcnlab {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// log2 of the team size: the smallest power of two covering the channel packs, at most a warp,
// and at least 32 / task_points lanes (so a warp has no more teams than its task has positions).
inline int team_shift(int64_t packs, int task_points) {
  int shift = 0;
  while (((int64_t(1) << shift) < packs || (32 >> shift) > task_points) && (1 << shift) < 32) ++shift;
  return shift;
}

// `pointer`, opaque to the compiler, so that it stays in registers: under register pressure the
// compiler rebuilt a sample's base address from the kernel parameters at every corner load (about
// 8 instructions each in the SASS of sample_columns; docs/perf-notes.md, session 14).
template <typename T>
__device__ __forceinline__ T* in_registers(T* pointer) {
  uintptr_t bits = reinterpret_cast<uintptr_t>(pointer);
  asm("" : "+l"(bits));
  return reinterpret_cast<T*>(bits);
}

// Whether the paired kernels may address a sample's corners by 32-bit element offsets.
template <int D>
bool corner_offsets_fit_32_bits(const ConvGeometry<D>& geo) {
  return geo.in_plane * geo.in_channels < (int64_t(1) << 31);
}

// The sampling kernels split a chunk into warp tasks: `points` consecutive output positions of
// one row (sample, offset group, kernel point), tasks numbered row by row. A warp builds its
// task's stencils (lane i the one of position first_l + i) into its own shared slots, and its
// 32 >> shift teams of 2^shift lanes take the positions in turn (team j positions j, j + teams,
// ...; in the 2D paired sampling-gradient kernel consecutive positions instead, for its merged
// reductions), each lane a share of the point's channels. A warp syncs only with itself: no warp waits at
// a block barrier while another builds stencils, and the row bookkeeping (RowWalk) is done once
// per task.
//
// Task sizes measured on H200, bf16, 256-512 channels (docs/perf-notes.md, session 13; one build
// with the size a kernel argument, us for 4 / 8 / 16 / 32 positions): sample_columns
// B32 C256 28x28 132 / 106 / 99 / 95, B32 C512 14x14 52 / 49 / 48 / 68, B4 C256 100x168
// 373 / 309 / 305 / 364; sampling_grads_paired 322 / 303 / 303 / 327, 146 / 152 / 154 / 150,
// 920 / 887 / 917 / 1006. Small tasks leave lanes idle in the
// stencil build; large ones leave too few tasks (B32 C512 14x14: 2016 warps of 32 positions) and
// were slower for B4 C256 100x168 too, which has plenty.
constexpr int kColumnTaskPoints = 16;  // sample_columns
constexpr int kGradTaskPoints = 8;     // the sampling-gradient kernels

// A warp's tasks of kPoints positions. Teams have at least 32 / kPoints lanes (team_shift), so
// every team of a warp runs the same number of point iterations (the sampling-gradient kernels'
// shuffles need the whole warp). A compile-time task size keeps the capped kernels' registers:
// with the size a kernel argument, sample_columns spilled 32 bytes at its cap of 64 registers and
// took 95 instead of 90 us for 32 positions (B32 C256 28x28, H200).
template <int kPoints>
struct WarpTasks {
  static_assert(kPoints > 0 && kPoints <= 32 && (kPoints & (kPoints - 1)) == 0, "a power of two, at most a warp");
  static constexpr int points = kPoints;
  int team, lane, teams, first_t, warp;
  int64_t tiles_per_row, count;
  __device__ __forceinline__ WarpTasks(int shift, int64_t rows, int64_t out_plane)
      : team(1 << shift),
        lane(static_cast<int>(threadIdx.x) & (team - 1)),
        teams(32 >> shift),
        first_t((static_cast<int>(threadIdx.x) & 31) >> shift),
        warp(static_cast<int>(threadIdx.x) >> 5),
        tiles_per_row((out_plane + points - 1) / points),
        count(rows * tiles_per_row) {}
  // The warp's tasks (the same in all its lanes): fn(row, first_l).
  template <typename Fn>
  __device__ __forceinline__ void for_each(Fn&& fn) const {
    for (int64_t task = static_cast<int64_t>(blockIdx.x) * kWarps + warp; task < count;
         task += static_cast<int64_t>(gridDim.x) * kWarps) {
      const int64_t row = task / tiles_per_row;
      fn(row, (task - row * tiles_per_row) * points);
    }
  }
};

// How a kernel covers a chunk. Lanes take packs of `pack` consecutive channels (16-byte
// accesses) when the channel counts and pointers allow it, else single channels; grid: one warp
// per task, at most kMaxBlocks blocks (the warps loop over the rest).
struct Launch {
  dim3 grid;
  int shift;
  int pack;
  cudaStream_t stream;
};

constexpr int64_t kMaxBlocks = int64_t(1) << 30;

inline bool pack_aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The grid of a launch of WarpTasks<points>.
template <int D>
void size_grid(Launch& l, const ConvGeometry<D>& geo, int64_t n, int points) {
  const int64_t tasks = n * geo.offset_groups * geo.kernel_points * ((geo.out_plane + points - 1) / points);
  l.grid = dim3(static_cast<unsigned>(std::clamp<int64_t>((tasks + kWarps - 1) / kWarps, 1, kMaxBlocks)));
}

template <int D>
Launch launch_over_points(const ConvGeometry<D>& geo, int64_t n, int vector_pack, int points,
                          std::initializer_list<const void*> pointers) {
  const int64_t per_group = geo.channels_per_offset_group();
  bool vectorize = per_group % vector_pack == 0 && (geo.in_channels / geo.groups) % vector_pack == 0;
  for (const void* ptr : pointers) vectorize = vectorize && pack_aligned(ptr);
  Launch l{};
  l.pack = vectorize ? vector_pack : 1;
  l.shift = team_shift(per_group / l.pack, points);
  l.stream = at::cuda::getCurrentCUDAStream();
  size_grid(l, geo, n, points);
  return l;
}

// A task's sample points, built once per point and then read by every lane that handles one of
// the point's channels. Stencil indices are scaled by C_in, so they address the channels-last
// input directly.
template <int D, typename coord_t>
struct PointSlot {
  Stencil<D, coord_t> stencil;
  coord_t modulation;
};

// A slot's corners as the paired kernels use them: 32-bit element offsets within the sample (the
// caller checks corner_offsets_fit_32_bits), weights (0 outside) and inside flags, copied into
// registers once per position.
template <int D>
struct PairedCorners {
  static constexpr int kCorners = Stencil<D, float>::kCorners;
  uint32_t index[kCorners];
  float weight[kCorners];
  bool inside[kCorners];

  __device__ __forceinline__ explicit PairedCorners(const PointSlot<D, float>& slot) {
    for (int corner = 0; corner < kCorners; ++corner) {
      index[corner] = static_cast<uint32_t>(slot.stencil.index[corner]);
      weight[corner] = slot.stencil.weight[corner];
      inside[corner] = slot.stencil.inside[corner];
    }
  }
};

// Lane i < points of the warp builds the slot of position first_l + i into the warp's slots.
template <int D, typename coord_t, typename scalar_t>
__device__ __forceinline__ void build_task(PointSlot<D, coord_t>* warp_slots, const ConvGeometry<D>& geo,
                                           const scalar_t* offset, const scalar_t* mask, int64_t b, int64_t g,
                                           int64_t k, int64_t first_l, int points) {
  __syncwarp();  // the warp's readers of its previous task are done with the slots
  const int i = static_cast<int>(threadIdx.x) & 31;
  if (i < points && first_l + i < geo.out_plane) {
    PointSlot<D, coord_t>& slot = warp_slots[i];
    slot.modulation = load_sample_point(geo, offset, mask, b, g, k, first_l + i, slot.stencil);
    for (int corner = 0; corner < Stencil<D, coord_t>::kCorners; ++corner) slot.stencil.index[corner] *= geo.in_channels;
  }
  __syncwarp();
}

// The row (b_local, g, k) of a task and one lane's walk over the channels of offset group g.
//
// Channel c of the point at output position l goes to column
// (gc*n*L + b_local*L + l)*R + k*C_in/G + (c - gc*C_in/G) of the (G, n*L, R) columns, gc being
// c's conv group; the walk keeps gc's part of that index up to date instead of dividing. A pack
// never straddles two groups: packing requires C_in/G and C_in/offset_groups to be multiples.
template <int D, int V>
struct RowWalk {
  int64_t b_local, g, k;
  int64_t first_c, c_end;  // this lane's packs start at first_c, first_c + team * V, ... < c_end
  int64_t in_per_group, rows_per_group, group_jump, first_group;
  int64_t n, out_plane;

  __device__ __forceinline__ RowWalk(const ConvGeometry<D>& geo, int64_t n_, int64_t row, int lane)
      : n(n_), out_plane(geo.out_plane) {
    k = row % geo.kernel_points;
    g = (row / geo.kernel_points) % geo.offset_groups;
    b_local = row / (geo.kernel_points * geo.offset_groups);
    const int64_t per_group = geo.channels_per_offset_group();
    in_per_group = geo.in_channels / geo.groups;
    rows_per_group = in_per_group * geo.kernel_points;
    first_c = g * per_group + lane * V;
    c_end = (g + 1) * per_group;
    first_group = first_c / in_per_group;
    group_jump = n * out_plane * rows_per_group - in_per_group;
  }

  // Calls fn(c, column index of c) for the first channel c of each of this lane's packs of the
  // point at output position l.
  template <typename Fn>
  __device__ __forceinline__ void for_each_pack(int64_t l, int team, Fn&& fn) const {
    int64_t group_end = (first_group + 1) * in_per_group;
    int64_t column_base = ((first_group * n + b_local) * out_plane + l) * rows_per_group + k * in_per_group -
                          first_group * in_per_group;
    for (int64_t c = first_c; c < c_end; c += team * V) {
      while (c >= group_end) {
        group_end += in_per_group;
        column_base += group_jump;
      }
      fn(c, column_base + c);
    }
  }
};

// The dtype of the im2col backward's gradient columns (weight rows^T @ grad output, rounded from
// the GEMM's fp32 accumulators; cuBLAS may reduce split-K partial sums in bf16 where PyTorch's
// allow_bf16_reduced_precision_reduction allows it, as for any bf16 matmul): bf16 for bf16, whose
// exponent range is fp32's, so a grad output scaled for AMP overflows it no sooner than the grad
// output itself, and the GEMM writes and the sampling-gradient kernel reads half the bytes; opmath
// otherwise (fp16 columns, sums of C_out products, could overflow where the fp16 grad output does
// not).
template <typename scalar_t>
using grad_column_t =
    std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, c10::BFloat16, at::opmath_type<scalar_t>>;

// 16-bit packs are stored as one vector of 32-bit words: NVVM lowers the copy of a Pack (of
// c10::Half, c10::BFloat16, or of uint32_t words; also a memcpy into a uint4) into one store per
// element (8 STG.U16 for a 16-byte pack of the im2col forward's columns; docs/perf-notes.md,
// session 12). `target` is global memory (the column buffers).
template <typename T, int V>
__device__ __forceinline__ void store_pack(T* target, const at::opmath_type<T> (&values)[V], at::opmath_type<T> scale) {
  if constexpr (sizeof(T) == 2 && (V == 4 || V == 8)) {
    uint32_t words[V / 2];
    for (int j = 0; j < V / 2; ++j) words[j] = layout_copy::pack_pair<T>(scale * values[2 * j], scale * values[2 * j + 1]);
    // __stwb (the default write-back store) keeps the vector: a plain store of a uint4 or uint2
    // is split into its 32-bit fields too.
    if constexpr (V == 8) {
      __stwb(reinterpret_cast<uint4*>(target), make_uint4(words[0], words[1], words[2], words[3]));
    } else {
      __stwb(reinterpret_cast<uint2*>(target), make_uint2(words[0], words[1]));
    }
  } else {
    Pack<T, V> pack;
    for (int v = 0; v < V; ++v) pack.v[v] = static_cast<T>(scale * values[v]);
    *reinterpret_cast<Pack<T, V>*>(target) = pack;
  }
}

// interpolate_channels for a pack of 8 half or bfloat16 channels: every inside corner's 16-byte
// load is issued before the first is used. interpolate_channels loads each corner under its own
// branch, and the SASS of sample_columns waited for each load in turn: four exposed load latencies
// per position in 2D, its largest stall (docs/perf-notes.md, session 13). Same sums, same order
// (outside corners add 0 * 0: a -0 may become +0).
template <int D, typename scalar_t, typename coord_t>
__device__ __forceinline__ void interpolate_pack(const Stencil<D, coord_t>& s, const scalar_t* plane,
                                                 float (&value)[implicit_gemm::kPack]) {
  constexpr int kCorners = Stencil<D, coord_t>::kCorners;
  uint4 bits[kCorners];
  for (int c = 0; c < kCorners; ++c) {
    bits[c] = s.inside[c] ? __ldg(reinterpret_cast<const uint4*>(plane + s.index[c])) : make_uint4(0, 0, 0, 0);
  }
  for (int v = 0; v < implicit_gemm::kPack; ++v) value[v] = 0;
  // Outside corners: zero bits and weight 0, summed without a branch (x + 0 * 0 == x).
  for (int c = 0; c < kCorners; ++c) implicit_gemm::accumulate_pack<scalar_t>(value, static_cast<float>(s.weight[c]), bits[c]);
}

template <int D, int V, typename scalar_t>
__device__ __forceinline__ void sample_columns_body(const ConvGeometry<D> geo, const scalar_t* __restrict__ input,
                          const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t b0,
                          int64_t n, int shift, scalar_t* __restrict__ columns) {
  using coord_t = at::opmath_type<scalar_t>;
  __shared__ PointSlot<D, coord_t> slots[kWarps * kColumnTaskPoints];
  const WarpTasks<kColumnTaskPoints> tasks(shift, n * geo.offset_groups * geo.kernel_points, geo.out_plane);
  PointSlot<D, coord_t>* warp_slots = slots + tasks.warp * tasks.points;
  tasks.for_each([&](int64_t row, int64_t first_l) {
    const RowWalk<D, V> walk(geo, n, row, tasks.lane);
    build_task(warp_slots, geo, offset, mask, b0 + walk.b_local, walk.g, walk.k, first_l, tasks.points);
    const scalar_t* sample_input = in_registers(input + (b0 + walk.b_local) * geo.in_plane * geo.in_channels);
    for (int t = tasks.first_t; t < tasks.points && first_l + t < geo.out_plane; t += tasks.teams) {
      const Stencil<D, coord_t> stencil = warp_slots[t].stencil;
      const coord_t modulation = warp_slots[t].modulation;
      walk.for_each_pack(first_l + t, tasks.team, [&](int64_t c, int64_t column) {
        coord_t values[V];
        if constexpr (sizeof(scalar_t) == 2 && V == implicit_gemm::kPack) {
          interpolate_pack<D, scalar_t>(stencil, sample_input + c, values);
        } else {
          interpolate_channels<D, V>(stencil, sample_input + c, values);
        }
        store_pack<scalar_t, V>(columns + column, values, modulation);
      });
    }
  });
}

// sample_columns_body for half types with one conv group: each lane takes two packs of 8 channels
// per position, channels c..c+7 and c + 8T..c + 8T + 7 of a team of T lanes, and issues both packs'
// corner loads before it uses them (8 loads of 16 bytes in flight in 2D, where the general body
// has 4), and the position's head (its stencil from shared memory, its column index) is paid once
// per two packs. Same sums in the same order as interpolate_pack. Corner addresses are 32-bit
// offsets from the sample's base address (the caller checks that a sample's input has fewer than
// 2^31 elements), and outside corners are summed as zeros with weight 0 instead of branched over.
// With the base address kept in registers (below): 358 -> 264 instructions per position in the
// SASS (2D bf16), B32 C256 28x28 77 -> 54 us (docs/perf-notes.md, session 14).
template <int D, typename scalar_t>
__device__ __forceinline__ void sample_columns_paired_body(const ConvGeometry<D> geo, const scalar_t* __restrict__ input,
                                                           const scalar_t* __restrict__ offset,
                                                           const scalar_t* __restrict__ mask, int64_t b0, int64_t n,
                                                           int shift, scalar_t* __restrict__ columns) {
  static_assert(sizeof(scalar_t) == 2, "half types");
  constexpr int V = implicit_gemm::kPack;
  constexpr int kCorners = Stencil<D, float>::kCorners;
  __shared__ PointSlot<D, float> slots[kWarps * kColumnTaskPoints];
  const int64_t K = geo.kernel_points;
  const int64_t C = geo.in_channels;
  const int64_t L = geo.out_plane;
  const int64_t R = C * K;  // one conv group
  const int64_t per_group = geo.channels_per_offset_group();
  const WarpTasks<kColumnTaskPoints> tasks(shift, n * geo.offset_groups * K, L);
  PointSlot<D, float>* warp_slots = slots + tasks.warp * tasks.points;
  tasks.for_each([&](int64_t row, int64_t first_l) {
    const RowWalk<D, V> walk(geo, n, row, tasks.lane);  // for its (b_local, g, k)
    const int64_t k = walk.k, g = walk.g, b_local = walk.b_local;
    build_task(warp_slots, geo, offset, mask, b0 + b_local, g, k, first_l, tasks.points);
    // Each corner load's address is one IMAD.WIDE.U32 from this base.
    const scalar_t* sample_input = in_registers(input + (b0 + b_local) * geo.in_plane * C);
    const uint32_t c_end = static_cast<uint32_t>((g + 1) * per_group);
    const uint32_t pair_step = static_cast<uint32_t>(V * tasks.team);  // a lane's first pack to its second
    for (int t = tasks.first_t; t < tasks.points && first_l + t < L; t += tasks.teams) {
      const int64_t l = first_l + t;
      const PointSlot<D, float>& slot = warp_slots[t];
      const PairedCorners<D> regs(slot);
      const auto& [index, weight, inside] = regs;
      const float modulation = slot.modulation;
      scalar_t* column_row = columns + (b_local * L + l) * R + k * C;
      for (uint32_t c = static_cast<uint32_t>(g * per_group) + V * tasks.lane; c < c_end; c += 2 * pair_step) {
        const bool second = c + pair_step < c_end;  // per_group % 8 == 0: a pack is whole or absent
        // Corners outside the input (and an absent second pack) get zero bits and weight 0, and
        // the sums run over every corner: x + 0 * 0 == x, so they are those of interpolate_pack
        // (a -0 may become +0), without a branch per corner.
        uint4 bits[2][kCorners];
        for (int corner = 0; corner < kCorners; ++corner) {
          const uint32_t at = index[corner] + c;
          bits[0][corner] = inside[corner] ? __ldg(reinterpret_cast<const uint4*>(sample_input + at)) : uint4{};
          const bool load_second = inside[corner] && second;
          bits[1][corner] = load_second ? __ldg(reinterpret_cast<const uint4*>(sample_input + (at + pair_step))) : uint4{};
        }
        for (int h = 0; h < 2; ++h) {
          float values[V] = {};
          for (int corner = 0; corner < kCorners; ++corner) {
            implicit_gemm::accumulate_pack<scalar_t>(values, weight[corner], bits[h][corner]);
          }
          if (h == 0 || second) store_pack<scalar_t, V>(column_row + c + h * pair_step, values, modulation);
        }
      }
    }
  });
}

// The end of a point in the sampling-gradient kernels: the team's sums of the position and mask
// gradients (shuffles over the whole warp, so every team runs every point iteration, also past the
// end), written by the lane given `write` (lane 0 of a valid point). row = (b_local * G + g) * K + k,
// so b0 * G * K + row is the point's row in the mask.
template <int D, typename acc_t, typename scalar_t>
__device__ __forceinline__ void write_point_grads(const ConvGeometry<D>& geo, acc_t (&grad_pos)[D], acc_t grad_mod,
                                                  int team, bool write, int64_t b0, int64_t row, int64_t l,
                                                  scalar_t* __restrict__ grad_offset, scalar_t* __restrict__ grad_mask) {
  // Unrolled over every delta a team of up to 32 lanes can need (team is a power of two, the same
  // in the whole warp): the loop over team / 2 .. 1 had a runtime trip count and cost 14
  // instructions a step, 10% of sampling_grads_paired's (docs/perf-notes.md, session 12).
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) {
    if (delta >= team) continue;
    for (int a = 0; a < D; ++a) grad_pos[a] += __shfl_xor_sync(0xffffffffu, grad_pos[a], delta);
    grad_mod += __shfl_xor_sync(0xffffffffu, grad_mod, delta);
  }
  if (!write) return;
  const int64_t L = geo.out_plane;
  const int64_t mask_row = b0 * geo.offset_groups * geo.kernel_points + row;
  if (grad_offset) {
    for (int a = 0; a < D; ++a) grad_offset[(mask_row * D + a) * L + l] = static_cast<scalar_t>(grad_pos[a]);
  }
  if (grad_mask) grad_mask[mask_row * L + l] = static_cast<scalar_t>(grad_mod);
}

// One pass for all sampling gradients: each (point, channel) reads its gradient column once,
// adds its share to the point's offset and mask gradients (summed over the team with shuffles)
// and scatters into grad_input (fp32 for half types, so the atomics are native fp32/fp64 adds;
// the team's lanes hit consecutive channels, so they coalesce). It can also write the sampled
// columns, which it computes anyway, for the weight gradient.
template <int D, int V, typename scalar_t>
__device__ __forceinline__ void sampling_grads_body(const ConvGeometry<D> geo, const scalar_t* __restrict__ input,
                          const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t b0,
                          int64_t n, int shift, const grad_column_t<scalar_t>* __restrict__ grad_columns,
                          scalar_t* __restrict__ grad_offset, scalar_t* __restrict__ grad_mask,
                          at::opmath_type<scalar_t>* __restrict__ grad_input, scalar_t* __restrict__ columns) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ PointSlot<D, acc_t> slots[kWarps * kGradTaskPoints];
  const bool want_position = grad_offset != nullptr || grad_mask != nullptr;
  const int64_t C = geo.in_channels;
  const int64_t L = geo.out_plane;
  const WarpTasks<kGradTaskPoints> tasks(shift, n * geo.offset_groups * geo.kernel_points, L);
  PointSlot<D, acc_t>* warp_slots = slots + tasks.warp * tasks.points;
  tasks.for_each([&](int64_t row, int64_t first_l) {
    const RowWalk<D, V> walk(geo, n, row, tasks.lane);
    build_task(warp_slots, geo, offset, mask, b0 + walk.b_local, walk.g, walk.k, first_l, tasks.points);
    const scalar_t* sample_input = input + (b0 + walk.b_local) * geo.in_plane * C;
    acc_t* sample_grad_input = grad_input ? grad_input + walk.b_local * geo.in_plane * C : nullptr;
    // Every team runs points / teams iterations (also past the end, as the shuffles need the
    // whole warp).
    for (int t = tasks.first_t; t < tasks.points; t += tasks.teams) {
      const int64_t l = first_l + t;
      const bool valid = l < L;
      acc_t grad_pos[D] = {};
      acc_t grad_mod = 0;
      if (valid) {
        const Stencil<D, acc_t> stencil = warp_slots[t].stencil;
        const acc_t modulation = warp_slots[t].modulation;
        walk.for_each_pack(l, tasks.team, [&](int64_t c, int64_t column) {
          acc_t grad[V];
          load_widened<acc_t, V>(grad_columns + column, grad);
          if (want_position) {
            acc_t values[V];
            acc_t dvalues[V][D];
            interpolate_channels_with_position_grad<D, V>(stencil, sample_input + c, values, dvalues);
            for (int v = 0; v < V; ++v) {
              grad_mod += grad[v] * values[v];
              for (int a = 0; a < D; ++a) grad_pos[a] += grad[v] * dvalues[v][a];
            }
            if (columns) store_pack<scalar_t, V>(columns + column, values, modulation);
          } else if (columns) {
            acc_t values[V];
            interpolate_channels<D, V>(stencil, sample_input + c, values);
            store_pack<scalar_t, V>(columns + column, values, modulation);
          }
          if (sample_grad_input) {
            for (int corner = 0; corner < Stencil<D, acc_t>::kCorners; ++corner) {
              if (!stencil.inside[corner]) continue;
              const acc_t scale = modulation * stencil.weight[corner];
              acc_t scaled[V];
              for (int v = 0; v < V; ++v) scaled[v] = grad[v] * scale;
              atomic_add_pack<V>(sample_grad_input + stencil.index[corner] + c, scaled);
            }
          }
        });
        // The offset gradient carries the modulation once per point, not once per channel.
        for (int a = 0; a < D; ++a) grad_pos[a] *= modulation;
      }
      if (!want_position) continue;
      write_point_grads(geo, grad_pos, grad_mod, tasks.team, valid && tasks.lane == 0, b0, row, l, grad_offset,
                        grad_mask);
    }
  });
}

// The V channels of a pack of gradient columns in fp32, or zeros where `load` is false: the raw
// bits are loaded under a predicate and widened after, so that the caller issues the load with its
// other loads. (Widening inside an `if`, ptxas waited for each gradient-column load in turn before
// the corner sums: the 4-channel kernel took 9-10% longer.) bf16 columns: one load of 8 or 16
// bytes; fp32 columns (fp16 inputs): 16-byte loads, since the pointer is only 16-byte aligned.
template <typename scalar_t, int V, typename T>
__device__ __forceinline__ void load_grad_pack_if(const T* source, bool load, float (&grad)[V]) {
  static_assert(V % 4 == 0, "packs of 4 or 8 channels");
  if constexpr (std::is_same_v<T, float>) {
    for (int q = 0; q < V; q += 4) {
      const float4 f = load ? __ldg(reinterpret_cast<const float4*>(source + q)) : make_float4(0, 0, 0, 0);
      grad[q] = f.x;
      grad[q + 1] = f.y;
      grad[q + 2] = f.z;
      grad[q + 3] = f.w;
    }
  } else {
    static_assert(std::is_same_v<T, scalar_t>, "16-bit gradient columns of the input's type");
    using bits_t = std::conditional_t<V == 8, uint4, uint2>;
    const bits_t bits = load ? __ldg(reinterpret_cast<const bits_t*>(source)) : bits_t{};
    implicit_gemm::widen_bits<scalar_t, V>(bits, grad);
  }
}

// sampling_grads_body for half types with one conv group and channel packs of V = 4 or 8 (one or
// two fp32 grad_input reductions of 16 bytes per pack): each lane takes two packs per iteration,
// channels c..c+V-1 and c + VT..c + VT + V-1 of a team of T lanes, and issues both packs' corner and
// gradient-column loads before it uses them, where the general body walks one pack per iteration;
// a vector atomic of the team still covers 4T contiguous channels (whole 32-byte sectors). The
// position and mask gradients come from one dot product per corner, sum_v grad[v] * x_corner[v],
// weighted by the corner's slopes and weight (as in the fused backward) instead of per-channel
// position derivatives. Packs of 8 (16-byte corner loads, 16 channels per lane) halve the lanes
// per position, so a warp of 256-channel teams takes two positions at a time.
template <int D, int V, typename scalar_t, bool kMerge>
__device__ __forceinline__ void sampling_grads_paired_body(const ConvGeometry<D> geo, const scalar_t* __restrict__ input,
                          const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t b0,
                          int64_t n, int shift, const grad_column_t<scalar_t>* __restrict__ grad_columns,
                          scalar_t* __restrict__ grad_offset, scalar_t* __restrict__ grad_mask,
                          float* __restrict__ grad_input, scalar_t* __restrict__ columns) {
  static_assert(sizeof(scalar_t) == 2, "half types");
  static_assert(V == 4 || V == 8, "packs of 8 or 16 bytes of the input");
  using bits_t = std::conditional_t<V == 8, uint4, uint2>;
  constexpr int kCorners = Stencil<D, float>::kCorners;
  __shared__ PointSlot<D, float> slots[kWarps * kGradTaskPoints];
  const bool want_position = grad_offset != nullptr || grad_mask != nullptr;
  const int64_t K = geo.kernel_points;
  const int64_t C = geo.in_channels;
  const int64_t L = geo.out_plane;
  const int64_t R = C * K;  // one conv group
  const int64_t per_group = geo.channels_per_offset_group();
  const WarpTasks<kGradTaskPoints> tasks(shift, n * geo.offset_groups * K, L);
  PointSlot<D, float>* warp_slots = slots + tasks.warp * tasks.points;
  tasks.for_each([&](int64_t row, int64_t first_l) {
    const RowWalk<D, V> walk(geo, n, row, tasks.lane);  // for its (b_local, g, k)
    const int64_t k = walk.k, g = walk.g, b_local = walk.b_local;
    build_task(warp_slots, geo, offset, mask, b0 + b_local, g, k, first_l, tasks.points);
    // Base addresses in registers and 32-bit corner offsets, as in sample_columns_paired_body
    // (the caller checks corner_offsets_fit_32_bits).
    const scalar_t* sample_input = in_registers(input + (b0 + b_local) * geo.in_plane * C);
    float* sample_grad_input = in_registers(grad_input ? grad_input + b_local * geo.in_plane * C : nullptr);
    const uint32_t c_end = static_cast<uint32_t>((g + 1) * per_group);
    // A pair of packs covers 2VT channels: lane r loads and sums channels c0 + h*VT + Vr ..+V-1 (h
    // = 0, 1), and reduces into grad_input channels c0 + h*VT + 4qT + 4r ..+3 (q < V/4), so that each
    // vector reduction of the team covers 4T contiguous channels (whole sectors; with packs of 8 in
    // the load layout, each would cover half of every sector it touches, twice the sector requests).
    // For V = 8 the reduction layout reloads its 4 gradient columns (L1 hits: the team has just read
    // them). The loop over pairs is the team's, so a lane past its own packs still reduces.
    const uint32_t team = static_cast<uint32_t>(tasks.team);
    const uint32_t lane = static_cast<uint32_t>(tasks.lane);
    // kMerge (2D): a team takes consecutive positions of its task, and a corner of a position that is
    // also a corner of the team's next position (the same pixel; known from the stencils in shared
    // memory) is not reduced there but added into that corner's reduction at the next position (its
    // gradient columns reloaded: L1 hits), unless it received one itself (pairs, not chains). The
    // kernel is bound by the L2 traffic of its grad_input reductions (docs/perf-notes.md, session
    // 15); with offsets N(0, 1), 0.78 of a position's 4 corners are also corners of its right-hand
    // neighbour (2 of 4 with smooth offsets). H200, bf16, packs of 8, us without / with: B32 C256
    // 28x28 290.3 / 263.7, B32 C512 14x14 148.7 / 131.9, B4 C256 100x168 849.7 / 765.3 (session 16).
    const int per_team = tasks.points / tasks.teams;
    bool received[kCorners] = {};
    float received_scale[kCorners] = {};
    for (int u = 0; u < per_team; ++u) {
      const int t = kMerge ? tasks.first_t * per_team + u : tasks.first_t + u * tasks.teams;
      const int64_t l = first_l + t;
      const bool valid = l < L;
      float grad_pos[D] = {};
      float grad_mod = 0;
      bool deferred[kCorners] = {};
      bool next_received[kCorners] = {};
      float next_scale[kCorners] = {};
      if (valid) {
        const PointSlot<D, float>& slot = warp_slots[t];
        const PairedCorners<D> regs(slot);
        const auto& [index, weight, inside] = regs;
        const float modulation = slot.modulation;
        if constexpr (kMerge) {
          if (u + 1 < per_team && l + 1 < L) {
            const PointSlot<D, float>& next = warp_slots[t + 1];
            for (int d = 0; d < kCorners; ++d) {
              const uint32_t next_index = static_cast<uint32_t>(next.stencil.index[d]);
              const bool next_inside = next.stencil.inside[d];
              for (int c = 0; c < kCorners; ++c) {
                const bool match = next_inside && inside[c] && !received[c] && index[c] == next_index;
                deferred[c] = deferred[c] || match;
                next_received[d] = next_received[d] || match;
                next_scale[d] = match ? modulation * weight[c] : next_scale[d];
              }
            }
          }
        }
        bool any_received = false;
        for (int c = 0; c < kCorners; ++c) any_received = any_received || received[c];
        // The point's rows of the gradient columns and columns; channels are 32-bit offsets from them.
        const int64_t column_base = (b_local * L + l) * R + k * C;
        const grad_column_t<scalar_t>* grad_row = grad_columns + column_base;
        scalar_t* column_row = columns ? columns + column_base : nullptr;
        for (uint32_t c0 = static_cast<uint32_t>(g * per_group); c0 < c_end; c0 += 2 * V * team) {
          const uint32_t c_pair[2] = {c0 + V * lane, c0 + V * (team + lane)};
          // per_group % V == 0: a pack is whole or absent
          const bool present[2] = {c_pair[0] < c_end, c_pair[1] < c_end};
          float grad[2][V];
          bits_t corners[kCorners][2];  // V channels each; zero bits outside
          for (int h = 0; h < 2; ++h) {
            load_grad_pack_if<scalar_t, V>(grad_row + c_pair[h], present[h], grad[h]);
            for (int corner = 0; corner < kCorners; ++corner) {
              const bool load = inside[corner] && present[h];
              const uint32_t at = index[corner] + c_pair[h];
              corners[corner][h] = load ? __ldg(reinterpret_cast<const bits_t*>(sample_input + at)) : bits_t{};
            }
          }
          // Every corner is summed, outside ones as zeros with weight 0 (x + 0 * 0 == x: the sums
          // of skipping them, a -0 may become +0); an outside corner's dot product is set to 0, so
          // a non-finite gradient column does not reach the position gradients through it.
          float values[2][V] = {};
          for (int corner = 0; corner < kCorners; ++corner) {
            float dot = 0;
            for (int h = 0; h < 2; ++h) {
              float x[V];
              implicit_gemm::widen_bits<scalar_t, V>(corners[corner][h], x);
              for (int v = 0; v < V; ++v) {
                values[h][v] += weight[corner] * x[v];
                dot += grad[h][v] * x[v];
              }
            }
            if (want_position) {
              dot = inside[corner] ? dot : 0.0f;
              grad_mod += weight[corner] * dot;
              for (int a = 0; a < D; ++a) grad_pos[a] += corner_slope<D, float>(slot.stencil.frac, corner, a) * dot;
            }
          }
          if (column_row) {
            for (int h = 0; h < 2; ++h) {
              if (present[h]) store_pack<scalar_t, V>(column_row + c_pair[h], values[h], modulation);
            }
          }
          if (sample_grad_input) {
            // The reduction layout's channels and gradient columns.
            constexpr int kParts = 2 * (V / 4);  // part = h * V / 4 + q
            uint32_t e[kParts];
            float grad4[kParts][4];
            float previous4[kMerge ? kParts : 1][4];
            for (int part = 0; part < kParts; ++part) {
              const int h = part / (V / 4), q = part % (V / 4);
              e[part] = c0 + V * team * h + 4 * (q * team + lane);
              if constexpr (V == 4) {
                for (int v = 0; v < 4; ++v) grad4[part][v] = grad[h][v];  // the same channels
              } else {
                load_grad_pack_if<scalar_t, 4>(grad_row + e[part], e[part] < c_end, grad4[part]);
              }
              if constexpr (kMerge) {
                load_grad_pack_if<scalar_t, 4>(grad_row - R + e[part], any_received && e[part] < c_end, previous4[part]);
              }
            }
            // Predicated reductions rather than a branch per corner. (Their order, corners outside
            // or inside the parts' loop, made no difference: H200, session 16.)
            for (int corner = 0; corner < kCorners; ++corner) {
              const float scale = modulation * weight[corner];
              for (int part = 0; part < kParts; ++part) {
                float scaled[4];
                for (int v = 0; v < 4; ++v) scaled[v] = grad4[part][v] * scale;
                if constexpr (kMerge) {
                  for (int v = 0; v < 4; ++v) {
                    scaled[v] = received[corner] ? scaled[v] + previous4[part][v] * received_scale[corner] : scaled[v];
                  }
                }
                atomic_add_pack_if(sample_grad_input + (index[corner] + e[part]), scaled,
                                   inside[corner] && !deferred[corner] && e[part] < c_end);
              }
            }
          }
        }
        for (int a = 0; a < D; ++a) grad_pos[a] *= modulation;
      }
      for (int c = 0; c < kCorners; ++c) {
        received[c] = next_received[c];
        received_scale[c] = next_scale[c];
      }
      if (!want_position) continue;
      write_point_grads(geo, grad_pos, grad_mod, tasks.team, valid && tasks.lane == 0, b0, row, l, grad_offset,
                        grad_mask);
    }
  });
}

// The kernels of the two bodies above, with and without a register cap. The cap (blocks per SM
// the compiler must fit) pays where the kernels are latency-bound and occupancy is limited by
// registers. Measured for bf16 2D on H200 (docs/perf-notes.md, session 7): sample_columns 74 -> 64
// registers (4 blocks per SM, 36 bytes of spill), sampling_grads 98 -> 80 (3 blocks, 56 bytes):
// B32 C256 28x28 159 -> 131 and 430 -> 364 us, its fwd+bwd GPU time -10%; 4 blocks for
// sampling_grads (64 registers) were slower than none. 3D (it would spill 150-430 bytes), 1D and
// fp32/fp64 (not measured) keep the compiler's default. Since interpolate_pack keeps four 16-byte
// corner loads in flight, sample_columns is capped at 3 blocks (80 registers, 8 bytes of spill): at
// 4 blocks it spilled 68 bytes, and B32 C256 28x28 / B4 C256 100x168 took 84.3 / 253.0 us against
// 82.8 / 230.6 (B32 C512 14x14 41.4 against 43.6; session 13).
template <int D, typename scalar_t>
constexpr bool capped_sampling() {
  return D == 2 && sizeof(scalar_t) == 2;
}

#define DCNLAB_SAMPLING_PARAMS                                                                               \
  const ConvGeometry<D> geo, const scalar_t *__restrict__ input, const scalar_t *__restrict__ offset,     \
      const scalar_t *__restrict__ mask, int64_t b0, int64_t n, int shift
template <int D, int V, typename scalar_t>
__global__ void __launch_bounds__(kThreads) sample_columns_kernel(DCNLAB_SAMPLING_PARAMS, scalar_t* __restrict__ columns) {
  sample_columns_body<D, V, scalar_t>(geo, input, offset, mask, b0, n, shift, columns);
}
template <int D, int V, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 3)
    sample_columns_capped_kernel(DCNLAB_SAMPLING_PARAMS, scalar_t* __restrict__ columns) {
  sample_columns_body<D, V, scalar_t>(geo, input, offset, mask, b0, n, shift, columns);
}
// The paired forward body (half types, one conv group; V is the pack width, 8). ptxas (bf16): 2D 80
// registers, 3D 128, 1D 64, no spills; the caps below no longer bind. Capped at 4 blocks per SM
// (64 registers, no spills), B32 C256 28x28 / B32 C512 14x14 / B4 C256 100x168 took 54.6 / 30.4 /
// 166.5 us against 53.7 / 29.2 / 152.7 (H200, docs/perf-notes.md, session 14).
template <int D>
constexpr int paired_forward_blocks() {
  return D == 1 ? 3 : D == 2 ? 2 : 1;
}
template <int D, int V, typename scalar_t>
__global__ void __launch_bounds__(kThreads, paired_forward_blocks<D>())
    sample_columns_paired_kernel(DCNLAB_SAMPLING_PARAMS, scalar_t* __restrict__ columns) {
  sample_columns_paired_body<D, scalar_t>(geo, input, offset, mask, b0, n, shift, columns);
}

#define DCNLAB_GRADS_PARAMS                                                                                    \
  DCNLAB_SAMPLING_PARAMS, const grad_column_t<scalar_t>*__restrict__ grad_columns, scalar_t *__restrict__ grad_offset, \
      scalar_t *__restrict__ grad_mask, at::opmath_type<scalar_t> *__restrict__ grad_input, scalar_t *__restrict__ columns
template <int D, int V, typename scalar_t>
__global__ void __launch_bounds__(kThreads) sampling_grads_kernel(DCNLAB_GRADS_PARAMS) {
  sampling_grads_body<D, V, scalar_t>(geo, input, offset, mask, b0, n, shift, grad_columns, grad_offset, grad_mask,
                                      grad_input, columns);
}
template <int D, int V, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 3) sampling_grads_capped_kernel(DCNLAB_GRADS_PARAMS) {
  sampling_grads_body<D, V, scalar_t>(geo, input, offset, mask, b0, n, shift, grad_columns, grad_offset, grad_mask,
                                      grad_input, columns);
}
// The paired body (half types, one conv group; V is the pack width, 4 or 8; corners merged in 2D),
// capped at 2 blocks per SM (128 registers), not 3: with the cap of 3 it spilled 88 bytes and took
// 329 instead of 318 us for B32 C256 28x28 and 1966 instead of 1910 us of fwd+bwd GPU time for B4
// C256 100x168 on H200 (docs/perf-notes.md, session 10), and with 32-bit corner offsets it still did
// not pay: B32 C256 28x28 / B32 C512 14x14 / B4 C256 100x168 289.8 / 154.2 / 852.5 us against 295.5 /
// 148.5 / 857.4 (session 15). The cap of 2 binds the merged 2D body in packs of 8 (128 registers, 8
// bytes of spill; uncapped, the unmerged body took 150 registers and one block per SM in that build:
// 339 / 154 / 964 us, session 16); ptxas (bf16): 2D packs of 4 111 registers, 1D 80 / 116 (packs of
// 4 / 8), 3D 128, no spills.
template <int D, int V, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2) sampling_grads_paired_kernel(DCNLAB_GRADS_PARAMS) {
  sampling_grads_paired_body<D, V, scalar_t, D == 2>(geo, input, offset, mask, b0, n, shift, grad_columns, grad_offset,
                                             grad_mask, grad_input, columns);
}
#undef DCNLAB_GRADS_PARAMS
#undef DCNLAB_SAMPLING_PARAMS

// Channels-last (kChannelsLast and its copies from layout_copy.cuh).
struct CudaSampler : layout_copy::ChannelsLast {
  template <typename scalar_t>
  using column_t = scalar_t;
  template <typename scalar_t>
  using grad_column_t = dcnlab::grad_column_t<scalar_t>;

  static int64_t column_budget() { return int64_t(1) << 26; }

  static at::Tensor bias_grad(const at::Tensor& grad_output) { return dcnlab::bias_grad::compute(grad_output); }

  // The implicit GEMM of implicit_gemm.cuh for half types where it applies (weight_rows is the
  // contiguous (G, C_out/G, R) matrix in the channels-last row order; input is the op's, which
  // the kernel copies to channels-last or, in 1-D, reads through shared-memory windows).
  template <int D, typename scalar_t>
  static bool forward_fused(const ConvGeometry<D>& geo, const at::Tensor& input, const at::Tensor& offset,
                            const std::optional<at::Tensor>& mask, const at::Tensor& weight_rows,
                            const std::optional<at::Tensor>& bias, at::Tensor& output) {
    if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
      const auto w = weight_rows.contiguous();
      if (!implicit_gemm::applies(geo, input, w)) return false;
      const auto b = bias ? std::optional<at::Tensor>(bias->to(input.scalar_type()).contiguous()) : std::nullopt;
      implicit_gemm::forward<D, scalar_t>(geo, input, offset.const_data_ptr<scalar_t>(),
                                          mask ? mask->const_data_ptr<scalar_t>() : nullptr,
                                          w.const_data_ptr<scalar_t>(),
                                          b ? b->const_data_ptr<scalar_t>() : nullptr,
                                          output.mutable_data_ptr<scalar_t>());
      return true;
    } else {
      return false;
    }
  }

  // The fused backward of implicit_gemm_backward.cuh where it applies; `need` is (input,
  // offset, mask, weight, bias); it computes the bias gradient on the way where it can (grad_bias
  // stays undefined otherwise).
  template <int D, typename scalar_t>
  static bool backward_fused(const ConvGeometry<D>& geo, const at::Tensor& input, const at::Tensor& offset,
                             const std::optional<at::Tensor>& mask, const at::Tensor& weight_rows,
                             const at::Tensor& grad_output, std::array<bool, 5> need, at::Tensor& grad_input,
                             at::Tensor& grad_offset, at::Tensor& grad_mask, at::Tensor& grad_weight_rows,
                             at::Tensor& grad_bias) {
    if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
      const auto w = weight_rows.contiguous();
      if (!implicit_gemm::backward_applies(geo, input, w)) return false;
      implicit_gemm::backward<D, scalar_t>(geo, input, offset, mask, w, grad_output, need[0], need[1], need[2],
                                           need[3], need[4], grad_input, grad_offset, grad_mask, grad_weight_rows,
                                           grad_bias);
      return true;
    } else {
      return false;
    }
  }

  template <int D, typename scalar_t>
  static void sample_columns(const ConvGeometry<D>& geo, const scalar_t* input, const scalar_t* offset,
                             const scalar_t* mask, int64_t b0, int64_t n, scalar_t* columns) {
    constexpr int kPack = 16 / sizeof(scalar_t);
    auto l = launch_over_points(geo, n, kPack, kColumnTaskPoints, {input, columns});
    auto launch = [&](auto kernel) {
      kernel<<<l.grid, kThreads, 0, l.stream>>>(geo, input, offset, mask, b0, n, l.shift, columns);
    };
    if constexpr (sizeof(scalar_t) == 2) {
      // Two packs of 8 channels per lane (sample_columns_paired_body) where the offset group has
      // 16 or more packs (128+ channels). DCNLAB_UNPAIRED_FORWARD (any value) selects the general
      // body instead: same columns bit for bit (a GPU test compares the two), for A/B timing.
      if (l.pack == kPack && geo.groups == 1 && geo.channels_per_offset_group() >= 16 * kPack &&
          corner_offsets_fit_32_bits(geo) && std::getenv("DCNLAB_UNPAIRED_FORWARD") == nullptr) {
        l.shift = team_shift((geo.channels_per_offset_group() + 2 * kPack - 1) / (2 * kPack), kColumnTaskPoints);
        size_grid(l, geo, n, kColumnTaskPoints);
        launch(sample_columns_paired_kernel<D, kPack, scalar_t>);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    if constexpr (capped_sampling<D, scalar_t>()) {
      l.pack == kPack ? launch(sample_columns_capped_kernel<D, kPack, scalar_t>)
                      : launch(sample_columns_capped_kernel<D, 1, scalar_t>);
    } else {
      l.pack == kPack ? launch(sample_columns_kernel<D, kPack, scalar_t>) : launch(sample_columns_kernel<D, 1, scalar_t>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <int D, typename scalar_t>
  static void sampling_grads(const ConvGeometry<D>& geo, const scalar_t* input, const scalar_t* offset,
                             const scalar_t* mask, int64_t b0, int64_t n, const grad_column_t<scalar_t>* grad_columns,
                             scalar_t* grad_offset, scalar_t* grad_mask, at::opmath_type<scalar_t>* grad_input,
                             scalar_t* columns) {
    // Packs of 16 bytes of the fp32 (fp64) grad_input, so that each atomic is one vector add (the
    // gradient columns' pack is 8 bytes where they are bf16).
    constexpr int kPack = 16 / sizeof(at::opmath_type<scalar_t>);
    auto l = launch_over_points(geo, n, kPack, kGradTaskPoints, {input, grad_columns, grad_input, columns});
    auto launch = [&](auto kernel) {
      kernel<<<l.grid, kThreads, 0, l.stream>>>(geo, input, offset, mask, b0, n, l.shift, grad_columns, grad_offset,
                                                grad_mask, grad_input, columns);
    };
    if constexpr (sizeof(scalar_t) == 2) {
      // Two packs of 4 or 8 channels per lane (sampling_grads_paired_body): teams of the smallest
      // power of two covering the offset group's channels in steps of two packs.
      if (l.pack == kPack && geo.groups == 1 && corner_offsets_fit_32_bits(geo)) {
        // Packs of 8 (16-byte corner loads) in 1D and 2D where the offset group's channels are a
        // multiple of 8, else packs of 4; DCNLAB_GRADS_PACK=4 forces packs of 4 (for A/B timing and
        // the tests). H200, bf16, the kernel with packs of 8 / 4, before the merged corners: B32
        // C256 28x28 290 / 299 us, B32 C512 14x14 149 / 150, B4 C256 100x168 850 / 876; merged 264 /
        // 309, 132 / 138, 765 / 852 (docs/perf-notes.md, session 16).
        const int64_t per_group = geo.channels_per_offset_group();
        const bool force_four = implicit_gemm::env_is("DCNLAB_GRADS_PACK", "4");
        const int pack = !force_four && per_group % 8 == 0 && D <= 2 ? 8 : kPack;
        // (The grid, one warp per task, does not depend on the team size.)
        l.shift = team_shift((per_group + 2 * pack - 1) / (2 * pack), kGradTaskPoints);
        if constexpr (D <= 2) {  // 3D with packs of 8: 172 registers (one block per SM), not measured
          if (pack == 8) {
            launch(sampling_grads_paired_kernel<D, 8, scalar_t>);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
        }
        launch(sampling_grads_paired_kernel<D, kPack, scalar_t>);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    if constexpr (capped_sampling<D, scalar_t>()) {
      l.pack == kPack ? launch(sampling_grads_capped_kernel<D, kPack, scalar_t>)
                      : launch(sampling_grads_capped_kernel<D, 1, scalar_t>);
    } else {
      l.pack == kPack ? launch(sampling_grads_kernel<D, kPack, scalar_t>) : launch(sampling_grads_kernel<D, 1, scalar_t>);
    }
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
  if (output_mask[0]) {
    // Raises under torch.use_deterministic_algorithms(True) (warns with warn_only=True).
    at::globalContext().alertNotDeterministic(
        "dcnlab::deform_conv_backward on CUDA (the input gradient is accumulated with atomic adds, so its "
        "rounding can differ run to run; the offset, mask, weight and bias gradients are deterministic)");
  }
  return deform_conv_backward<CudaSampler>(grad_output, input, offset, weight, mask, stride, padding, dilation,
                                           output_mask);
}

}  // namespace
}  // namespace dcnlab

TORCH_LIBRARY_IMPL(dcnlab, CUDA, m) {
  m.impl("deform_conv", &dcnlab::deform_conv_cuda);
  m.impl("deform_conv_backward", &dcnlab::deform_conv_backward_cuda);
}
