// Sampling math of the N-D deformable convolution, shared by the CPU and CUDA kernels.
//
// Everything here is header-only and compiles as host code and as CUDA device code, so the
// interpolation and its gradient exist exactly once. Templated on the number of spatial
// dimensions D (1, 2 or 3).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>

#if defined(__CUDACC__)
#define DCN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DCN_HOST_DEVICE inline
#endif

namespace dcnlab {

// Shape and hyper-parameters of one deformable convolution, flattened for kernels.
template <int D>
struct ConvGeometry {
  int64_t batch;
  int64_t in_channels;
  int64_t out_channels;
  int64_t groups;          // convolution groups
  int64_t offset_groups;   // G in the op contract
  int64_t in_size[D];
  int64_t out_size[D];
  int64_t kernel[D];
  int64_t stride[D];
  int64_t padding[D];
  int64_t dilation[D];
  int64_t in_plane;       // prod(in_size): elements of one input channel
  int64_t out_plane;      // prod(out_size): L, output positions per channel
  int64_t kernel_points;  // prod(kernel): K

  DCN_HOST_DEVICE int64_t channels_per_offset_group() const { return in_channels / offset_groups; }
};

// The 2^D interpolation corners of one sample point.
//
// Corners outside the input keep weight 0 and index 0 (inside false), so a loop over corners that
// reads them never reads out of bounds (the input plane is never empty: the op rejects empty
// inputs); the interpolation loops skip them.
template <int D, typename coord_t>
struct Stencil {
  static constexpr int kCorners = 1 << D;
  int64_t index[kCorners];  // flat offset of the corner within one input channel plane (a
                            // backend with another layout may scale it by its element stride)
  coord_t weight[kCorners];  // N-linear weight, 0 where the corner lies outside
  coord_t frac[D];           // position within the cell along each axis
  bool inside[kCorners];
};

// Sample position of kernel point `kernel_point` for output position `out_index` along each
// axis: out * stride - padding + k * dilation + offset, kept as its integer part `base` and the
// offset `shift` (the offset element in coord_t, exact), not summed: a coord_t sum rounds where
// |base| is large (fp32 spacing 2^-11 at 4096), which moves the cell and the fraction; split, the
// cell and fraction are those of the exact sum. `offset` points at the displacement along axis 0;
// axis a is at offset[a * axis_stride].
template <int D, typename coord_t, typename scalar_t>
DCN_HOST_DEVICE void sample_position(const ConvGeometry<D>& geo, int64_t out_index, int64_t kernel_point,
                                     const scalar_t* offset, int64_t axis_stride, int64_t (&base)[D],
                                     coord_t (&shift)[D]) {
  for (int a = D - 1; a >= 0; --a) {
    const int64_t o = out_index % geo.out_size[a];
    out_index /= geo.out_size[a];
    const int64_t k = kernel_point % geo.kernel[a];
    kernel_point /= geo.kernel[a];
    base[a] = o * geo.stride[a] - geo.padding[a] + k * geo.dilation[a];
    shift[a] = static_cast<coord_t>(offset[a * axis_stride]);
  }
}

// The cell of the sample point base + shift: its lower corner and position within the cell along
// each axis. The cell is base + floor(shift) and the fraction shift - floor(shift), both exact (the
// cell an integer in coord_t, exact below 2^24 in fp32), so they are those of the exact sum,
// whatever the size of base (see sample_position). Returns false for a point outside (-1, size)
// along any axis, or with a non-finite coordinate (a NaN or infinite cell fails the range test):
// it contributes nothing, and neither does its gradient. The range test comes before any
// float-to-int conversion, so huge or NaN coordinates never reach one.
template <int D, typename coord_t>
DCN_HOST_DEVICE bool stencil_cell(const int64_t (&base)[D], const coord_t (&shift)[D], const int64_t (&in_size)[D],
                                  int64_t (&low)[D], coord_t (&frac)[D]) {
  coord_t cell[D];
  bool in_range = true;
  for (int a = 0; a < D; ++a) {
    const coord_t fl = floor(shift[a]);
    frac[a] = shift[a] - fl;
    cell[a] = static_cast<coord_t>(base[a]) + fl;
    // cell + frac > -1 and < size, frac in [0, 1) (bitwise: no branches).
    in_range = in_range & (cell[a] >= coord_t(-1)) & (cell[a] < static_cast<coord_t>(in_size[a])) &
               ((cell[a] > coord_t(-1)) | (frac[a] > coord_t(0)));
  }
  for (int a = 0; a < D; ++a) {
    if (in_range) {
      low[a] = static_cast<int64_t>(cell[a]);
    } else {
      low[a] = 0;
      frac[a] = 0;
    }
  }
  return in_range;
}

// Corner c of a cell (bit D-1-a of c: upper along axis a): whether it lies inside the input,
// its flat index within one channel plane and its N-linear weight.
template <int D, typename coord_t>
DCN_HOST_DEVICE bool stencil_corner(const int64_t (&low)[D], const coord_t (&frac)[D], const int64_t (&in_size)[D],
                                    bool in_range, int c, int64_t& index, coord_t& weight) {
  index = 0;
  weight = 1;
  bool inside = in_range;
  for (int a = 0; a < D; ++a) {
    const int bit = (c >> (D - 1 - a)) & 1;
    const int64_t q = low[a] + bit;
    inside = inside && q >= 0 && q < in_size[a];
    index = index * in_size[a] + q;
    weight *= bit ? frac[a] : coord_t(1) - frac[a];
  }
  return inside;
}

// Builds the stencil of a sample point (see stencil_cell for points outside the input).
template <int D, typename coord_t>
DCN_HOST_DEVICE void build_stencil(const int64_t (&base)[D], const coord_t (&shift)[D], const int64_t (&in_size)[D],
                                   Stencil<D, coord_t>& s) {
  int64_t low[D];
  const bool in_range = stencil_cell(base, shift, in_size, low, s.frac);
  for (int c = 0; c < Stencil<D, coord_t>::kCorners; ++c) {
    int64_t index;
    coord_t weight;
    const bool inside = stencil_corner(low, s.frac, in_size, in_range, c, index, weight);
    s.inside[c] = inside;
    s.index[c] = inside ? index : 0;
    s.weight[c] = inside ? weight : coord_t(0);
  }
}

// V consecutive elements, read or written as one access (16 bytes for V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

#if defined(__CUDACC__)
// The two bf16 of a 32-bit word (element 0 in the low half) in fp32, by one shift or one mask each
// (an fp32 is a bf16 with 16 more zero mantissa bits): c10's conversion spends two instructions on
// the upper half of a word.
__device__ __forceinline__ void widen_bf16_pair(uint32_t word, float& first, float& second) {
  first = __uint_as_float(word << 16);
  second = __uint_as_float(word & 0xffff0000u);
}
#endif

// V consecutive elements at `source` (one Pack access) in acc_t; in CUDA device code bf16 pairs by
// widen_bf16_pair.
template <typename acc_t, int V, typename T>
DCN_HOST_DEVICE void load_widened(const T* source, acc_t (&values)[V]) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float> && V % 2 == 0) {
    const auto words = *reinterpret_cast<const Pack<uint32_t, V / 2>*>(source);
    for (int j = 0; j < V / 2; ++j) widen_bf16_pair(words.v[j], values[2 * j], values[2 * j + 1]);
    return;
  }
#endif
  const auto packed = *reinterpret_cast<const Pack<T, V>*>(source);
  for (int v = 0; v < V; ++v) values[v] = static_cast<acc_t>(packed.v[v]);
}

// Interpolated values of V consecutive channels at the stencil's point, where the V channels'
// elements at stencil index i are plane[i], ..., plane[i + V - 1] (channels-last input; with
// V = 1, any layout whose channel plane starts at `plane`). Corners outside the input are
// skipped, not multiplied by their zero weight: 0 * inf would leak a non-finite value of element 0
// into points that do not touch it (and on CUDA the skip is a predicate on the load and the FMAs).
template <int D, int V, typename acc_t, typename coord_t, typename scalar_t>
DCN_HOST_DEVICE void interpolate_channels(const Stencil<D, coord_t>& s, const scalar_t* plane, acc_t (&value)[V]) {
  for (int v = 0; v < V; ++v) value[v] = 0;
  for (int c = 0; c < Stencil<D, coord_t>::kCorners; ++c) {
    if (!s.inside[c]) continue;
    acc_t x[V];
    load_widened<acc_t, V>(plane + s.index[c], x);
    const acc_t weight = static_cast<acc_t>(s.weight[c]);
    for (int v = 0; v < V; ++v) value[v] += weight * x[v];
  }
}

template <int D, typename acc_t, typename coord_t, typename scalar_t>
DCN_HOST_DEVICE acc_t interpolate(const Stencil<D, coord_t>& s, const scalar_t* plane) {
  acc_t value[1];
  interpolate_channels<D, 1, acc_t>(s, plane, value);
  return value[0];
}

// d(N-linear weight of `corner`) / d(sample position along axis a): +-prod of the other axes'
// factors, given the position within the cell (frac) along each axis.
template <int D, typename acc_t, typename frac_t>
DCN_HOST_DEVICE acc_t corner_slope(const frac_t (&frac)[D], int corner, int a) {
  acc_t factor = 1;
  for (int i = 0; i < D; ++i) {
    const int bit = (corner >> (D - 1 - i)) & 1;
    if (i == a) {
      factor = bit ? factor : -factor;
    } else {
      factor *= bit ? static_cast<acc_t>(frac[i]) : acc_t(1) - static_cast<acc_t>(frac[i]);
    }
  }
  return factor;
}

// Interpolated values and their derivatives with respect to the sample position along each
// axis. The derivative of a corner weight along axis a is +-prod of the other axes' factors.
template <int D, int V, typename acc_t, typename coord_t, typename scalar_t>
DCN_HOST_DEVICE void interpolate_channels_with_position_grad(const Stencil<D, coord_t>& s, const scalar_t* plane,
                                                             acc_t (&value)[V], acc_t (&grad_pos)[V][D]) {
  for (int v = 0; v < V; ++v) {
    value[v] = 0;
    for (int a = 0; a < D; ++a) grad_pos[v][a] = 0;
  }
  for (int c = 0; c < Stencil<D, coord_t>::kCorners; ++c) {
    if (!s.inside[c]) continue;
    acc_t x[V];
    load_widened<acc_t, V>(plane + s.index[c], x);
    acc_t slope[D];
    for (int a = 0; a < D; ++a) slope[a] = corner_slope<D, acc_t>(s.frac, c, a);
    const acc_t weight = static_cast<acc_t>(s.weight[c]);
    for (int v = 0; v < V; ++v) {
      value[v] += weight * x[v];
      for (int a = 0; a < D; ++a) grad_pos[v][a] += slope[a] * x[v];
    }
  }
}

template <int D, typename acc_t, typename coord_t, typename scalar_t>
DCN_HOST_DEVICE acc_t interpolate_with_position_grad(const Stencil<D, coord_t>& s, const scalar_t* plane,
                                                     acc_t (&grad_pos)[D]) {
  acc_t value[1];
  acc_t grads[1][D];
  interpolate_channels_with_position_grad<D, 1, acc_t>(s, plane, value, grads);
  for (int a = 0; a < D; ++a) grad_pos[a] = grads[0][a];
  return value[0];
}

// Row of kernel point k of offset group g of sample b in the mask, (B, G*K, L) seen as
// (B*G*K, L); the offset tensor holds D rows per such row.
template <int D>
DCN_HOST_DEVICE int64_t point_row(const ConvGeometry<D>& geo, int64_t b, int64_t g, int64_t k) {
  return (b * geo.offset_groups + g) * geo.kernel_points + k;
}

// Stencil of sample point (b, g, k, l) and its modulation (1 when mask is null).
template <int D, typename coord_t, typename scalar_t>
DCN_HOST_DEVICE coord_t load_sample_point(const ConvGeometry<D>& geo, const scalar_t* offset, const scalar_t* mask,
                                          int64_t b, int64_t g, int64_t k, int64_t l, Stencil<D, coord_t>& s) {
  const int64_t L = geo.out_plane;
  const int64_t row = point_row(geo, b, g, k);
  int64_t base[D];
  coord_t shift[D];
  sample_position(geo, l, k, offset + row * D * L + l, L, base, shift);
  build_stencil(base, shift, geo.in_size, s);
  return mask ? static_cast<coord_t>(mask[row * L + l]) : coord_t(1);
}

}  // namespace dcnlab
