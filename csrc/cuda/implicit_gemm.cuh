// Fused forward of the deformable convolution for half types: an implicit GEMM on tensor cores.
//
// The product is output (M = B*L, C_out/G) = columns (M, R) @ weight_rows^T (R, C_out/G) per
// conv group, with R = K*C_in/G in the order r = k*C_in/G + c (the order of weight_rows in the
// driver's channels-last layout). The columns never exist in device memory: a block owns a tile
// of BM output positions x BN output channels and walks R in steps of BK channels (32, or 64 where
// wide_steps() allows) of one kernel point. Per step it gathers the tile's sampled, modulated input
// values straight into shared memory, copies the matching weight slice with cp.async, and
// multiplies on tensor cores (ldmatrix + mma.sync m16n8k16, fp32 accumulation). The epilogue adds
// the bias in fp32 and writes (B, C_out, *out) through shared memory, positions contiguous.
//
// Pipelining (v12): the operand tiles are double-buffered, so one barrier per step separates a
// step's gather from its product and the product of step s overlaps the gather of step s+1 in
// other warps. The N-linear stencil of each (position, kernel point, offset group) is built
// once into one of two shared buffers, the step before it is needed, from offset and mask
// values loaded one stencil set ahead; a position's output coordinates are computed once per
// tile, so the step loop has no 64-bit division and no global load on its critical path other
// than the corners.
//
// Where it is used: the gather costs ~10 instructions per element (fp32 interpolation) and is
// repeated for every tile of output channels, so by default it runs for <= 128 channels per
// group (applies()); docs/perf-notes.md has the measurements and profiles.
//
// The kernel reads a channels-last copy of the input (a channels-last input in place), except in
// 1-D, where each block copies the window of input positions its tile samples into shared memory
// (kWindow below).
//
// Conditions (checked by the caller, which falls back to the im2col path otherwise): half or
// bfloat16, sm_80 or newer, C_in/G and C_in/offset_groups multiples of kBK (a step lies in one
// conv group and one offset group), 16-byte aligned input and weight rows (fusable()).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "layout_copy.cuh"

namespace dcnlab {
namespace implicit_gemm {

constexpr int kThreads = 256;  // 8 warps
constexpr int kBK = 32;        // channels per reduction step (the forward's steps: kBK or 64)
constexpr int kPack = 8;       // channels per 16-byte gather
constexpr int64_t kMaxFusedChannels = 128;  // per conv group, input and output (see applies())

// Element offset of (row, 16-byte chunk) in a forward operand tile of BK channels per row (no
// padding). BK = 32: rows of 64 bytes whose four chunks are XOR-swizzled by bits 1-2 of the row;
// BK = 64: rows of 128 bytes whose eight chunks are swizzled by bits 0-2. The eight rows an
// ldmatrix phase reads (one chunk each) and the rows of a gather or weight-copy phase (128
// contiguous bytes of a row pair or row) then fall on eight distinct 16-byte bank groups. The
// padded 80-byte rows before kept ldmatrix conflict-free but made every gather store and weight
// copy a 2-way bank conflict (docs/perf-notes.md, session 11). In both, kk / 8 of an ldmatrix step
// (kk = 16 with BK = 32; 16, 32, 48 with BK = 64) sets chunk bits above bit 0 and so toggles
// independently of the row for chunk 0 or 1: operand_offset(row, chunk + kk / 8) =
// operand_offset(row, chunk) ^ kk.
template <int BK>
__host__ __device__ constexpr int operand_offset(int row, int chunk) {
  static_assert(BK == 32 || BK == 64, "64- or 128-byte rows");
  return BK == 32 ? row * BK + 8 * (chunk ^ ((row >> 1) & 3)) : row * BK + 8 * (chunk ^ (row & 7));
}

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

// Tensor-core primitives: ldmatrix loads of 8x8 b16 tiles from shared memory (rows of 16 bytes
// at the lane addresses: lane / 8 picks one of the four tiles, lane % 8 its row; .trans delivers
// the transpose) and mma.sync m16n8k16 with fp32 accumulation. Fragment layouts are those of the
// PTX ISA: with g = lane / 4 and t = lane % 4, A regs hold (row g, cols 2t..2t+1), (g + 8, 2t),
// (g, 2t + 8), (g + 8, 2t + 8); B regs (rows 2t..2t+1, col g), (2t + 8, g); C (g, 2t..2t+1),
// (g + 8, 2t..2t+1).
__device__ __forceinline__ void load_matrix_x4(unsigned (&regs)[4], const void* row, bool transpose) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if (transpose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3])
                 : "r"(address)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3])
                 : "r"(address)
                 : "memory");
  }
#endif
}

template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&acc)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Zeros: the source of the gather for interpolation corners outside the input, so that the
// inner loop needs no per-element select (and a non-finite input element can never leak into a
// point that does not touch it). The forward reads it at the channel offsets of a conv group,
// so it covers kMaxZeroChannels 16-bit channels (applies() checks C_in/G against it).
constexpr int kMaxZeroChannels = 2048;
__device__ __align__(16) unsigned char zero_pack[2 * kMaxZeroChannels];

// The two half or bfloat16 values of a 32-bit word (element 0 in the low half) in fp32 (bf16 by
// widen_bf16_pair).
template <typename scalar_t>
__device__ __forceinline__ void widen_pair(uint32_t word, float& first, float& second) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    widen_bf16_pair(word, first, second);
  } else {
    __half2 pair;
    memcpy(&pair, &word, sizeof(pair));
    const float2 f = __half22float2(pair);
    first = f.x;
    second = f.y;
  }
}

// The V half or bfloat16 values of raw bits (uint2: 4, uint4: 8) in fp32.
template <typename scalar_t, int V, typename bits_t>
__device__ __forceinline__ void widen_bits(const bits_t& bits, float (&x)[V]) {
  static_assert(std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>, "half types");
  static_assert(sizeof(bits_t) * 8 == V * 16, "V 16-bit values");
  uint32_t words[V / 2];
  memcpy(words, &bits, sizeof(bits));
  for (int w = 0; w < V / 2; ++w) widen_pair<scalar_t>(words[w], x[2 * w], x[2 * w + 1]);
}

// values[v] += weight * channel v of a 16-byte pack of 8 half or bfloat16 values, in fp32.
template <typename scalar_t>
__device__ __forceinline__ void accumulate_pack(float (&values)[kPack], float weight, const uint4& bits) {
  float x[kPack];
  widen_bits<scalar_t, kPack>(bits, x);
  for (int v = 0; v < kPack; ++v) values[v] += weight * x[v];
}

// q / d and q % d, in 32 bits where q and d fit (64-bit division is a ~70-instruction routine).
__device__ __forceinline__ void divide(int64_t q, int64_t d, int64_t& quotient, int64_t& remainder) {
  if (q < (int64_t(1) << 31) && d < (int64_t(1) << 31)) {
    const unsigned qq = static_cast<unsigned>(q);
    const unsigned dd = static_cast<unsigned>(d);
    quotient = qq / dd;
    remainder = qq - static_cast<unsigned>(quotient) * dd;
  } else {
    quotient = q / d;
    remainder = q - quotient * d;
  }
}

// out * stride - padding along each axis for the flat output position l: with the kernel
// point's displacement (kernel_displacement) and the offset, the sample position.
template <int D>
__device__ __forceinline__ void output_origin(const ConvGeometry<D>& geo, int64_t l, int64_t (&origin)[D]) {
  for (int a = D - 1; a >= 0; --a) {
    int64_t rest, o;
    divide(l, geo.out_size[a], rest, o);
    l = rest;
    origin[a] = o * geo.stride[a] - geo.padding[a];
  }
}

// k's coordinate times the dilation along each axis.
template <int D>
__device__ __forceinline__ void kernel_displacement(const ConvGeometry<D>& geo, int k, int64_t (&displacement)[D]) {
  for (int a = D - 1; a >= 0; --a) {
    const int size = static_cast<int>(geo.kernel[a]);
    displacement[a] = (k % size) * geo.dilation[a];
    k /= size;
  }
}

// A sample point's stencil from its origin, displacement and raw offsets: the same arithmetic as
// sample_position() in sampling.h (integer part and offset kept apart), without the divisions.
template <int D>
__device__ __forceinline__ void stencil_at(const ConvGeometry<D>& geo, const int64_t (&origin)[D],
                                           const int64_t (&displacement)[D], const float (&raw)[D],
                                           Stencil<D, float>& s) {
  int64_t base[D];
  for (int a = 0; a < D; ++a) base[a] = origin[a] + displacement[a];
  build_stencil(base, raw, geo.in_size, s);
}

// Opts `kernel` into `bytes` of dynamic shared memory (above the 48 KiB default) on the current
// device, once per device, and returns how many of its blocks fit on one SM.
template <auto kernel>
int opt_in_shared_memory(int bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> blocks_per_device[kMaxDevices] = {};
  const int device = at::cuda::current_device();
  const bool cached = device < kMaxDevices;
  if (cached && blocks_per_device[device].load() > 0) return blocks_per_device[device].load();
  AT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  int count = 0;
  AT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, kernel, kThreads, bytes));
  count = count > 1 ? count : 1;
  if (cached) blocks_per_device[device].store(count);
  return count;
}

// One buffer of the tile's stencils (one kernel point, one offset group), structure of arrays:
// a warp's reads of eight consecutive rows hit consecutive banks.
template <int D, int BM, typename scalar_t>
struct ForwardPoints {
  const scalar_t* source[1 << D][BM];  // the corner's first channel of the block's group, or the zero page
  float weight[1 << D][BM];            // N-linear weight times the modulation
};

template <int D, int BM, int BN, int BK, typename scalar_t>
struct alignas(128) ForwardShared {
  static constexpr int kScratchLd = BM + 8;
  union {
    struct {
      __align__(16) uint16_t a[2][BM * BK];  // sampled values, (position, channel), per stage (operand_offset)
      __align__(16) uint16_t b[2][BN * BK];  // weight slice, (output channel, channel), per stage
    } operands;
    __align__(16) uint16_t scratch[BN * kScratchLd];  // epilogue: (output channel, position)
  };
  ForwardPoints<D, BM, scalar_t> points[2];
  int64_t out_base[BM];  // b * C_out * L + l of each tile row, -1 past the end
  // Written and read only by the thread that builds the row's stencils (kept here, not in
  // registers, which the accumulators need).
  int64_t row_sample[BM];     // b
  int64_t row_position[BM];   // l
  int64_t row_origin[D][BM];  // see output_origin
};

// The 1-D input window of a tile (kWindow): positions [lo, lo + length) of the tile's first
// sample, lo = the first row's origin - margin, in shared memory past ForwardShared as
// (position, channel of the block's group) rows of `ld` elements, and one row of zeros after
// them (corners outside the input). `length` covers every corner of the tile's rows at offsets
// within +-margin; corners outside it (other offsets, rows of the next sample) are read from the
// input in global memory.
struct Window {
  int64_t length;
  int64_t margin;
  int ld;
};

// Input window rows: C_in/G channels + 8 (16-byte aligned rows for the 16-byte corner reads).
// Rows of 64 bytes modulo 128 (C_in/G rounded up to an odd multiple of 32) would put the two rows
// of a gather phase on distinct bank halves more often, but made the window copy's 2-byte stores
// (lanes over positions) a 16-way bank conflict: 274 -> 291 us for B32 C128 4096 k9 on H200
// (docs/perf-notes.md, session 11).
inline int window_ld(int64_t in_per_group) { return static_cast<int>(in_per_group) + 8; }

// Shared memory of the window and its zero row.
inline int64_t window_bytes(const Window& window) { return (window.length + 1) * window.ld * 2; }

// Dynamic shared memory a block may have with the window: half an SM's (two blocks per SM).
inline int64_t window_budget() {
  const auto* properties = at::cuda::getCurrentDeviceProperties();
  return std::min<int64_t>(properties->sharedMemPerMultiprocessor / 2 - 1024, properties->sharedMemPerBlockOptin);
}

// Tiles: BM output positions x BN output channels; 8 warps as (BM / 32) x (8 / (BM / 32)), each
// warp 32 rows x BN / (8 / (BM / 32)) columns.
//
// kWindow (1-D only): `input` is the op's (B, C_in, L_in) input as it is, not a channels-last
// copy; each block first copies its window (see Window) into shared memory, and the stencils
// point into it (as byte offsets in shared memory: 16-byte LDS, a zero row for corners outside
// the input). Measured on H200 (docs/perf-notes.md, session 6): the kernel takes 276 us against
// 262 us for the channels-last kernel plus 38 us for the copy it needs (B32 C128 4096 k9), 128
// against 125 + 20 us (C64), and the forward holds no copy of the input.
template <int D, int BM, int BN, int BK, bool kWindow, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2)
    forward_kernel(const ConvGeometry<D> geo, const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                   const scalar_t* __restrict__ mask, const scalar_t* __restrict__ weight_rows,
                   const scalar_t* __restrict__ bias, scalar_t* __restrict__ output, const Window window) {
  static_assert(!kWindow || D == 1, "the input window is 1-D");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kWarpsM = BM / 32;
  constexpr int kWarpsN = (kThreads / 32) / kWarpsM;
  constexpr int kWarpN = BN / kWarpsN;  // columns per warp
  constexpr int kTilesN = kWarpN / 8;   // mma n8 tiles per warp
  constexpr int kPacksPerRow = BK / kPack;
  constexpr int kCorners = 1 << D;
  static_assert(kWarpsM * kWarpsN == kThreads / 32 && kWarpN % 16 == 0, "tile shape");
  static_assert(BM * kPacksPerRow % kThreads == 0 && BM <= kThreads, "gather and stencil roles");
  using Shared = ForwardShared<D, BM, BN, BK, scalar_t>;
  extern __shared__ __align__(128) unsigned char forward_shared[];
  auto& smem = *reinterpret_cast<Shared*>(forward_shared);

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
  const int K = static_cast<int>(geo.kernel_points);
  const int64_t R = static_cast<int64_t>(in_per_group) * K;
  const int64_t tiles_n = (out_per_group + BN - 1) / BN;
  const int g = static_cast<int>(blockIdx.y / tiles_n);
  const int64_t n0 = (blockIdx.y % tiles_n) * BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const scalar_t* zeros = reinterpret_cast<const scalar_t*>(zero_pack);
  const int chunks = in_per_group / BK;
  const int steps = K * chunks;

  // Thread tid < BM keeps tile row tid's sample, position and origin in shared memory. The
  // stencils of a row are built by kThreads / BM threads (all warps), each for a share of the
  // corners. Measured on H200 (docs/perf-notes.md, session 6) against warps 0..BM/32-1 building
  // whole stencils while the others waited at the step's barrier: kernel 164.9 -> 162.0 us
  // (B8 C64 128x128), 663.5 -> 641.5 (B4 C64 32^3), 1656 -> 1539 (B2 C32 64^3), 1-D unchanged.
  constexpr int kParts = kThreads / BM;
  constexpr int kPartCorners = kCorners / kParts > 0 ? kCorners / kParts : 1;
  const int build_row = tid % BM;
  const int build_part = tid / BM;
  const bool builds = build_part < kParts && build_part * kPartCorners < kCorners;
  const bool row_valid = m0 + build_row < M;
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
  if constexpr (kParts > 1) __syncthreads();  // the other parts read the row data

  // Steps run over (kernel point k, chunk of BK channels); a stencil set is one (k, offset
  // group), which changes with k and where a group's channels span several offset groups. The
  // cursor walks the sets' first steps without divisions.
  const int og_first = g * in_per_group / per_offset_group;
  struct Cursor {
    int step, k, c0, og, og_end;  // og_end: first channel past offset group og
    int coord[D];                 // k's coordinates
  };
  Cursor next{0, 0, 0, og_first, (og_first + 1) * per_offset_group, {}};
  auto advance = [&](Cursor& c) {  // to the first step of the next set
    for (;;) {
      ++c.step;
      c.c0 += BK;
      if (c.c0 == in_per_group) {
        c.c0 = 0;
        ++c.k;
        c.og = og_first;
        c.og_end = (og_first + 1) * per_offset_group;
        for (int a = D - 1; a >= 0; --a) {
          if (++c.coord[a] < static_cast<int>(geo.kernel[a])) break;
          c.coord[a] = 0;
        }
        return;
      }
      if (g * in_per_group + c.c0 == c.og_end) {
        ++c.og;
        c.og_end += per_offset_group;
        return;
      }
    }
  };
  float raw[D + 1] = {};  // offsets and modulation of this row at the next set to build
  auto load_raw = [&](const Cursor& c) {
    if (!row_valid || c.step >= steps) return;
    const int64_t l = smem.row_position[build_row];
    const int64_t row = (smem.row_sample[build_row] * geo.offset_groups + c.og) * K + c.k;
    for (int a = 0; a < D; ++a) raw[a] = static_cast<float>(offset[(row * D + a) * L + l]);
    raw[D] = mask ? static_cast<float>(mask[row * L + l]) : 1.0f;
  };
  // Corner by corner into shared memory (no whole Stencil live next to the accumulators): the
  // address of the corner's first channel of group g, or the zero page outside.
  const scalar_t* group_input = input + static_cast<int64_t>(g) * in_per_group;
  // kWindow: the window's sample and first position, and its copy (warps over channels, lanes
  // over positions: each warp reads runs of consecutive positions of one channel).
  uint16_t* window_rows = reinterpret_cast<uint16_t*>(forward_shared + sizeof(Shared));
  int64_t window_sample = 0, window_lo = 0;
  if constexpr (kWindow) {
    int64_t l0;
    divide(m0, L, window_sample, l0);
    window_lo = l0 * geo.stride[0] - geo.padding[0] - window.margin;
    const int64_t length_in = geo.in_size[0];
    const uint16_t* source =
        reinterpret_cast<const uint16_t*>(input) + (window_sample * C + static_cast<int64_t>(g) * in_per_group) * length_in;
    if (length_in % 8 == 0 && reinterpret_cast<uintptr_t>(input) % 16 == 0) {
      // Channel rows of 16-byte aligned runs of 8 positions: each task loads 16 positions of one
      // channel (two 16-byte loads, zeros outside the input) and stores the window's share of
      // them, lanes over channels (conflict-free 2-byte stores). About 4 instructions per element
      // against about 20 for the element-wise copy below, which was 12% of the 1-D forward's
      // instructions (docs/perf-notes.md, session 12).
      constexpr int kSpan = 16;
      const int64_t first = window_lo & ~int64_t(kSpan - 1);  // rounded down, also below zero
      const int lead = static_cast<int>(window_lo - first);
      const int spans = (lead + static_cast<int>(window.length) + kSpan - 1) / kSpan;
      for (int task = tid; task < spans * in_per_group; task += kThreads) {
        const int c = task % in_per_group;
        const int span = task / in_per_group;
        const int64_t x = first + span * kSpan;
        uint4 runs[2];
        for (int h = 0; h < 2; ++h) {
          const int64_t at = x + 8 * h;
          runs[h] = at >= 0 && at < length_in
                        ? __ldg(reinterpret_cast<const uint4*>(source + c * length_in + at))
                        : make_uint4(0, 0, 0, 0);
        }
        const unsigned words[8] = {runs[0].x, runs[0].y, runs[0].z, runs[0].w,
                                   runs[1].x, runs[1].y, runs[1].z, runs[1].w};
        const int p0 = span * kSpan - lead;  // window position of the task's first element
#pragma unroll
        for (int v = 0; v < kSpan; ++v) {
          const int p = p0 + v;
          if (static_cast<unsigned>(p) < static_cast<unsigned>(window.length)) {
            window_rows[p * window.ld + c] = static_cast<uint16_t>(words[v / 2] >> (16 * (v % 2)));
          }
        }
      }
    } else {
      // kFill channels per warp and pass, their loads issued before their stores (one load in
      // flight per thread left the fill latency-bound: measured, session 6).
      constexpr int kFill = 8;
      for (int c0 = warp; c0 < in_per_group; c0 += kFill * (kThreads / 32)) {
        for (int p = lane; p < window.length; p += 32) {
          const int64_t x = window_lo + p;
          const bool in_input = x >= 0 && x < length_in;
          uint16_t values[kFill];
#pragma unroll
          for (int u = 0; u < kFill; ++u) {
            const int c = c0 + u * (kThreads / 32);
            values[u] = in_input && c < in_per_group ? __ldg(source + c * length_in + x) : uint16_t(0);
          }
#pragma unroll
          for (int u = 0; u < kFill; ++u) {
            const int c = c0 + u * (kThreads / 32);
            if (c < in_per_group) window_rows[p * window.ld + c] = values[u];
          }
        }
      }
    }
    for (int c = tid; c < in_per_group; c += kThreads) window_rows[window.length * window.ld + c] = 0;
  }
  auto build = [&](const Cursor& c, int buffer) {
    ForwardPoints<D, BM, scalar_t>& points = smem.points[buffer];
    int64_t low[D] = {};
    float frac[D] = {};
    bool in_range = false;
    if (row_valid) {
      // The integer part of the sample position and its offset, apart (see sample_position()).
      int64_t base[D];
      float shift[D];
      for (int a = 0; a < D; ++a) {
        base[a] = smem.row_origin[a][build_row] + c.coord[a] * geo.dilation[a];
        shift[a] = raw[a];
      }
      in_range = stencil_cell(base, shift, geo.in_size, low, frac);
    }
    const float modulation = row_valid ? raw[D] : 0.0f;
    const int64_t sample = smem.row_sample[build_row];
    const int64_t sample_base = sample * geo.in_plane;
#pragma unroll
    for (int part_corner = 0; part_corner < kPartCorners; ++part_corner) {
      const int corner = build_part * kPartCorners + part_corner;
      int64_t index;
      float weight;
      const bool inside = stencil_corner(low, frac, geo.in_size, in_range, corner, index, weight);
      if constexpr (kWindow) {
        // Not a pointer here: the byte offset of the corner's row in the block's shared memory
        // (the window, or its zero row outside the input), or -1 - the input element index of
        // the group's channel 0 at this position (outside the window).
        const int64_t p = index - window_lo;
        int64_t code;
        if (!inside) {
          code = static_cast<int64_t>(sizeof(Shared)) + window.length * window.ld * 2;
        } else if (sample == window_sample && p >= 0 && p < window.length) {
          code = static_cast<int64_t>(sizeof(Shared)) + p * window.ld * 2;
        } else {
          code = -1 - ((sample * C + static_cast<int64_t>(g) * in_per_group) * geo.in_size[0] + index);
        }
        points.source[corner][build_row] = reinterpret_cast<const scalar_t*>(static_cast<intptr_t>(code));
      } else {
        points.source[corner][build_row] = inside ? group_input + (sample_base + index) * C : zeros;
      }
      // Outside corners read zeros; their weight is only the modulation, so that a non-finite
      // mask still gives what the other paths give (modulation * 0).
      points.weight[corner][build_row] = modulation * (inside ? weight : 1.0f);
    }
  };

  int buffer = 0;
  if (builds) {
    load_raw(next);
    build(next, 0);
  }
  advance(next);  // the set built next
  if (builds) load_raw(next);
  __syncthreads();

  // Weight slice copies: this thread's sources (at k = 0, c0 = 0) and targets.
  constexpr int kWeightCopies = (BN * kPacksPerRow + kThreads - 1) / kThreads;
  const scalar_t* weight_source[kWeightCopies];
  int weight_target[kWeightCopies];
  int weight_bytes[kWeightCopies];
  for (int i = 0; i < kWeightCopies; ++i) {
    const int p = tid + i * kThreads;
    const int col = p / kPacksPerRow;
    const int pack = p % kPacksPerRow;
    const bool valid = p < BN * kPacksPerRow && n0 + col < out_per_group;
    // An invalid copy reads nothing (0 bytes) from a valid address: the first weight row.
    weight_source[i] = valid ? weight_rows + (g * out_per_group + n0 + col) * R + pack * kPack : weight_rows;
    weight_target[i] = p < BN * kPacksPerRow ? operand_offset<BK>(col, pack) : -1;
    weight_bytes[i] = valid ? 16 : 0;
  }
  // ldmatrix lane addresses: A tiles (rows g / g + 8, k 0-7 / 8-15) in the order a0..a3, B tiles
  // (n 0-7 / 8-15 x k 0-7 / 8-15) as b0, b1 of n-tile j and b0, b1 of n-tile j + 1.
  const int a_row = warp_m * 32 + lane % 8 + 8 * ((lane / 8) % 2);
  const int a_col = 8 * (lane / 16);
  const int b_row = warp_n * kWarpN + lane % 8 + 8 * (lane / 16);
  const int b_col = 8 * ((lane / 8) % 2);
  const int a_offset = operand_offset<BK>(a_row, a_col / 8);  // at kk = 0 (operand_offset: ^ kk after)
  const int b_offset = operand_offset<BK>(b_row, b_col / 8);
  float acc[2][kTilesN][4] = {};
  int c0 = 0;  // the step's first channel
  for (int s = 0; s < steps; ++s) {
    uint16_t* a_tile = smem.operands.a[s & 1];
    uint16_t* b_tile = smem.operands.b[s & 1];
    // Weight slice: BN output channels x BK channels of kernel point k, copied asynchronously
    // while this thread gathers.
    const int64_t weight_step = static_cast<int64_t>(s) * BK;  // = k * C_in/G + c0
    for (int i = 0; i < kWeightCopies; ++i) {
      if (weight_target[i] >= 0) {
        copy_async_16(b_tile + weight_target[i], weight_source[i] + weight_step, weight_bytes[i]);
      }
    }
    // Gather: BM rows x BK / kPack packs.
    {
      const ForwardPoints<D, BM, scalar_t>& points = smem.points[buffer];
#pragma unroll
      for (int i = 0; i < BM * kPacksPerRow / kThreads; ++i) {
        const int p = tid + i * kThreads;
        const int row = p / kPacksPerRow;
        const int channel = c0 + (p % kPacksPerRow) * kPack;
        uint4 corners[kCorners];
        for (int corner = 0; corner < kCorners; ++corner) {
          const scalar_t* source = points.source[corner][row];
          if constexpr (kWindow) {
            const int64_t code = static_cast<int64_t>(reinterpret_cast<intptr_t>(source));
            if (code >= 0) {  // the window or its zero row
              corners[corner] = *reinterpret_cast<const uint4*>(forward_shared + code + channel * 2);
            } else {  // outside the window: 8 channels, a channel plane apart
              const uint16_t* element =
                  reinterpret_cast<const uint16_t*>(input) + (-1 - code) + channel * geo.in_size[0];
              unsigned words[4];
              for (int w = 0; w < 4; ++w) {
                words[w] = unsigned(__ldg(element + (2 * w) * geo.in_size[0])) |
                           (unsigned(__ldg(element + (2 * w + 1) * geo.in_size[0])) << 16);
              }
              corners[corner] = make_uint4(words[0], words[1], words[2], words[3]);
            }
          } else {
            corners[corner] = __ldg(reinterpret_cast<const uint4*>(source + channel));
          }
        }
        float values[kPack] = {};
        for (int corner = 0; corner < kCorners; ++corner) {
          accumulate_pack<scalar_t>(values, points.weight[corner][row], corners[corner]);
        }
        Pack<scalar_t, kPack> out;
        for (int v = 0; v < kPack; ++v) out.v[v] = static_cast<scalar_t>(values[v]);
        *reinterpret_cast<Pack<scalar_t, kPack>*>(a_tile + operand_offset<BK>(row, p % kPacksPerRow)) = out;
      }
    }
    // The next stencil set into the other buffer (its last readers finished before the
    // previous barrier), and the set after it prefetched.
    const bool switching = s + 1 == next.step;
    if (switching) {
      if (builds) build(next, buffer ^ 1);
      advance(next);
      if (builds) load_raw(next);
    }
    copy_async_wait_all();
    __syncthreads();
    if (switching) buffer ^= 1;
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned a[2][4];
      // operand_offset(row + 16 f, chunk + kk / 8) = operand_offset(row, chunk) ^ kk + 16 f BK: kk
      // toggles bits 1-2 of the chunk (bits 4-5 of the offset), 16 f rows keep the swizzle.
      for (int f = 0; f < 2; ++f) load_matrix_x4(a[f], a_tile + ((a_offset ^ kk) + f * 16 * BK), false);
      for (int j = 0; j < kTilesN; j += 2) {
        unsigned b[4];
        load_matrix_x4(b, b_tile + ((b_offset ^ kk) + j * 8 * BK), false);
        for (int f = 0; f < 2; ++f) {
          mma_16816<scalar_t>(acc[f][j], a[f], b[0], b[1]);
          mma_16816<scalar_t>(acc[f][j + 1], a[f], b[2], b[3]);
        }
      }
    }
    c0 += BK;
    if (c0 == in_per_group) c0 = 0;
  }

  // Epilogue: bias in fp32, then (output channel, position) through shared memory so that the
  // writes run along positions.
  __syncthreads();  // the operand tiles become the scratch
  constexpr int kScratchLd = Shared::kScratchLd;
  scalar_t* scratch = reinterpret_cast<scalar_t*>(smem.scratch);
  const int group = lane / 4;
  const int pair = (lane % 4) * 2;
  for (int j = 0; j < kTilesN; ++j) {
    for (int e = 0; e < 2; ++e) {
      const int col = warp_n * kWarpN + j * 8 + pair + e;
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
  // Each thread stores runs of 8 tile rows of one output channel: one 16-byte store where the
  // run is 8 consecutive positions of one sample at a 16-byte aligned address (every run when
  // the output's positions per sample are a multiple of 8), element by element otherwise. The
  // element-wise loop before cost ~28 instructions per element, 13% of the 1-D forward's
  // (docs/perf-notes.md, session 12).
  constexpr int kRuns = BM / 8;
  static_assert(kScratchLd % 8 == 0, "16-byte aligned scratch runs");
  for (int e = tid; e < BN * kRuns; e += kThreads) {
    const int col = e / kRuns;
    const int row = (e % kRuns) * 8;
    const int64_t channel = n0 + col;
    if (channel >= out_per_group) continue;
    const scalar_t* run = scratch + col * kScratchLd + row;
    const int64_t base = smem.out_base[row];
    scalar_t* plane = output + (g * out_per_group + channel) * L;
    if (base >= 0 && smem.out_base[row + 7] == base + 7 && reinterpret_cast<uintptr_t>(plane + base) % 16 == 0) {
      *reinterpret_cast<uint4*>(plane + base) = *reinterpret_cast<const uint4*>(run);
    } else {
      for (int v = 0; v < 8; ++v) {
        const int64_t at = smem.out_base[row + v];
        if (at >= 0) plane[at] = run[v];
      }
    }
  }
#endif
}

// Whether environment variable `name` is set to `value` (the A/B switches; read at every call).
inline bool env_is(const char* name, const char* value) {
  const char* variable = std::getenv(name);
  return variable != nullptr && std::strcmp(variable, value) == 0;
}

// DCNLAB_CUDA_PATH: "im2col" never fuses, "fused" fuses wherever the kernels can (for
// measurements), anything else (or unset) picks per shape.
inline std::string requested_path() {
  const char* path_variable = std::getenv("DCNLAB_CUDA_PATH");
  return path_variable ? path_variable : "auto";
}

// Conditions both fused kernels need (not the per-shape pick): half types, sm_80 or newer, C_in/G
// and C_in/offset_groups multiples of kBK (a step lies in one conv group and one offset group),
// 16-byte aligned weight rows and channels-last input rows. `input` is the op's input as given:
// one already in channels-last order is read in place (its pointer must be aligned), any other
// is copied (an aligned allocation) or, in 1-D, read through the input window.
template <int D>
bool fusable(const ConvGeometry<D>& geo, const at::Tensor& input, const at::Tensor& weight_rows) {
  const auto dtype = input.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;
  const int64_t in_per_group = geo.in_channels / geo.groups;
  const bool view = input.movedim(1, -1).is_contiguous();
  return in_per_group % kBK == 0 && geo.channels_per_offset_group() % kBK == 0 && in_per_group <= kMaxZeroChannels &&
         (!view || reinterpret_cast<uintptr_t>(input.const_data_ptr()) % 16 == 0) &&
         reinterpret_cast<uintptr_t>(weight_rows.const_data_ptr()) % 16 == 0 && geo.in_channels < (int64_t(1) << 30);
}

// Whether the fused forward handles this call; the caller uses the im2col path otherwise.
template <int D>
bool applies(const ConvGeometry<D>& geo, const at::Tensor& input, const at::Tensor& weight_rows) {
  const std::string path = requested_path();
  if (path == "im2col") return false;
  const int64_t in_per_group = geo.in_channels / geo.groups;
  // Measured on H200 (docs/perf-notes.md, v8): faster than im2col for C_in/G = C_out/G <= 128
  // (1.2-2.4x), ~2x slower for 256 and 512.
  const bool wide = in_per_group > kMaxFusedChannels || geo.out_channels / geo.groups > kMaxFusedChannels;
  if (wide && path != "fused") return false;
  return fusable(geo, input, weight_rows) && (geo.batch * geo.out_plane + 63) / 64 < (int64_t(1) << 31) &&
         geo.groups * ((geo.out_channels / geo.groups + 63) / 64) <= 65535 &&  // grid.y
         geo.kernel_points * (in_per_group / kBK) < (int64_t(1) << 31);       // steps (int)
}

// Tile rows of the forward for C_out/G output channels per group.
inline int forward_block_m(int64_t out_per_group) { return out_per_group > 128 ? 64 : 128; }

// The 1-D input window for `input` (see Window), or length 0 where the forward copies the input
// to channels-last instead: an input already in that order, or a window past the shared memory
// that keeps two blocks per SM (strides or dilations that spread a tile's corners widely).
template <int D>
Window input_window(const ConvGeometry<D>& geo, const at::Tensor& input, int shared_bytes) {
  Window window{0, 0, 0};
  if constexpr (D == 1) {
    if (input.movedim(1, -1).is_contiguous() || !input.is_contiguous()) return window;
    // Offsets beyond +-8 positions are rare for a trained layer's N(0, a few) offsets; they are
    // read from global memory.
    constexpr int64_t kMargin = 8;
    const int64_t rows = forward_block_m(geo.out_channels / geo.groups);
    const int64_t length =
        (rows - 1) * geo.stride[0] + (geo.kernel[0] - 1) * geo.dilation[0] + 2 + 2 * kMargin;
    const int ld = window_ld(geo.in_channels / geo.groups);
    // length grows with stride and dilation (up to ~2^62): compared in 64 bits, before any narrowing.
    const Window candidate{length, kMargin, ld};
    if (length < (int64_t(1) << 20) && shared_bytes + window_bytes(candidate) <= window_budget() &&
        geo.in_size[0] < (int64_t(1) << 31)) {
      window = candidate;
    }
  }
  return window;
}

// Whether the forward may take steps of 64 channels (a kernel point's whole 128-byte corner row per
// gather, two iterations' corner loads in flight, half the steps and barriers): C_in/G and
// C_in/offset_groups multiples of 64, so that no step straddles a conv or offset group. The caller
// adds its own conditions (2-D or 3-D, tiles of 64 output channels, two blocks per SM).
// DCNLAB_FWD_BK=32 keeps steps of 32 (A/B timing; the same output bit for bit); unset or any other
// value, the default.
template <int D>
bool wide_steps(const ConvGeometry<D>& geo) {
  if (env_is("DCNLAB_FWD_BK", "32")) return false;
  return (geo.in_channels / geo.groups) % 64 == 0 && geo.channels_per_offset_group() % 64 == 0;
}

// The fused forward; `input` as in fusable().
template <int D, typename scalar_t>
void forward(const ConvGeometry<D>& geo, const at::Tensor& input, const scalar_t* offset, const scalar_t* mask,
             const scalar_t* weight_rows, const scalar_t* bias, scalar_t* output) {
  const int64_t out_per_group = geo.out_channels / geo.groups;
  const auto stream = at::cuda::getCurrentCUDAStream();
  // One tile of output channels where possible: the gather is repeated for every tile.
  auto run = [&](auto block_m, auto block_n) {
    constexpr int BM = decltype(block_m)::value;
    constexpr int BN = decltype(block_n)::value;
    constexpr int bytes = sizeof(ForwardShared<D, BM, BN, kBK, scalar_t>);
    const int64_t m_tiles = (geo.batch * geo.out_plane + BM - 1) / BM;
    const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(geo.groups * ((out_per_group + BN - 1) / BN)));
    const Window window = input_window(geo, input, bytes);
    if constexpr (D == 1) {
      if (window.length > 0) {
        constexpr auto kernel = forward_kernel<D, BM, BN, kBK, true, scalar_t>;
        const int shared = bytes + static_cast<int>(window_bytes(window));  // <= window_budget()
        // The kernel may use up to the budget on this device: set once per device, with the same
        // value whichever thread gets there first.
        opt_in_shared_memory<kernel>(static_cast<int>(window_budget()));
        kernel<<<grid, kThreads, shared, stream>>>(geo, input.const_data_ptr<scalar_t>(), offset, mask,
                                                         weight_rows, bias, output, window);
        return;
      }
    }
    const at::Tensor channels_last = layout_copy::to_channels_last(input);
    auto launch = [&](auto block_k) {
      constexpr int BK = decltype(block_k)::value;
      constexpr int shared = sizeof(ForwardShared<D, BM, BN, BK, scalar_t>);
      constexpr auto kernel = forward_kernel<D, BM, BN, BK, false, scalar_t>;
      opt_in_shared_memory<kernel>(shared);
      kernel<<<grid, kThreads, shared, stream>>>(geo, channels_last.const_data_ptr<scalar_t>(), offset, mask,
                                                 weight_rows, bias, output, window);
    };
    // Steps of 64 channels where they apply and the card still fits two blocks per SM (65-78 KiB of
    // shared memory each: not on sm_86/sm_89, whose SMs have 100 KiB). Measured on H200
    // (docs/perf-notes.md, session 17): 9-11% faster forward kernels.
    if constexpr (D >= 2 && BN == 64) {
      constexpr auto wide_kernel = forward_kernel<D, BM, BN, 64, false, scalar_t>;
      if (wide_steps(geo) &&
          opt_in_shared_memory<wide_kernel>(static_cast<int>(sizeof(ForwardShared<D, BM, BN, 64, scalar_t>))) >= 2) {
        launch(std::integral_constant<int, 64>());
        return;
      }
    }
    launch(std::integral_constant<int, kBK>());
  };
  // Two blocks per SM (128 registers per thread). Measured on H200 (docs/perf-notes.md, v12):
  // 64-row tiles or three blocks per SM (80 registers) are 10-40% slower on every benchmark shape.
  if (out_per_group > 128) {
    run(std::integral_constant<int, 64>(), std::integral_constant<int, 256>());
  } else if (out_per_group > 64) {
    run(std::integral_constant<int, 128>(), std::integral_constant<int, 128>());
  } else {
    run(std::integral_constant<int, 128>(), std::integral_constant<int, 64>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace implicit_gemm
}  // namespace dcnlab
