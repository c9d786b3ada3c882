// CPU kernels of dcnlab::deform_conv: the deformable sampling, multithreaded with
// at::parallel_for. The GEMMs and chunking live in deform_conv_driver.h.
//
// Work is split into units of (sample, offset group, tile of sample points). A unit builds the
// stencils of its points once and reuses them for every channel of its offset group, so the
// interpolation weights are computed once per (point, offset group), not once per channel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../deform_conv_driver.h"

namespace dcnlab {
namespace {

constexpr int64_t kTilePoints = 64;

// Stencils, modulation and column positions of up to kTilePoints consecutive sample points
// (j = k*L + l) of one sample b and offset group g.
template <int D, typename scalar_t>
struct PointTile {
  using coord_t = at::opmath_type<scalar_t>;
  Stencil<D, coord_t> stencil[kTilePoints];
  coord_t modulation[kTilePoints];
  int64_t column[kTilePoints];  // (k, b_local, l) part of the column index
  int64_t count;

  void load(const ConvGeometry<D>& geo, const scalar_t* offset, const scalar_t* mask, int64_t b, int64_t g,
            int64_t first_point, int64_t b_local, int64_t chunk) {
    const int64_t L = geo.out_plane;
    count = std::min(kTilePoints, geo.kernel_points * L - first_point);
    for (int64_t t = 0; t < count; ++t) {
      const int64_t k = (first_point + t) / L;
      const int64_t l = (first_point + t) % L;
      modulation[t] = load_sample_point(geo, offset, mask, b, g, k, l, stencil[t]);
      column[t] = (k * chunk + b_local) * L + l;
    }
  }
};

// Units of (local sample, offset group, tile), in that nesting order.
struct TileUnits {
  int64_t groups;
  int64_t tiles;
  int64_t count(int64_t n) const { return n * groups * tiles; }
  void split(int64_t unit, int64_t& b_local, int64_t& g, int64_t& tile) const {
    tile = unit % tiles;
    g = (unit / tiles) % groups;
    b_local = unit / (tiles * groups);
  }
};

template <int D>
TileUnits tile_units(const ConvGeometry<D>& geo) {
  return {geo.offset_groups, (geo.kernel_points * geo.out_plane + kTilePoints - 1) / kTilePoints};
}

struct CpuSampler {
  template <typename scalar_t>
  using column_t = at::opmath_type<scalar_t>;
  template <typename scalar_t>
  using grad_column_t = at::opmath_type<scalar_t>;

  static constexpr bool kChannelsLast = false;

  static int64_t column_budget() { return int64_t(1) << 23; }

  // at::sum accumulates half types in fp32 and rounds once.
  static at::Tensor bias_grad(const at::Tensor& grad_output) {
    std::vector<int64_t> dims{0};
    for (int64_t a = 2; a < grad_output.dim(); ++a) dims.push_back(a);
    return at::sum(grad_output, dims);
  }

  template <int D, typename scalar_t>
  static bool forward_fused(const ConvGeometry<D>&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
                            at::Tensor&) {
    return false;
  }

  template <int D, typename scalar_t>
  static bool backward_fused(const ConvGeometry<D>&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                             std::array<bool, 5>, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&) {
    return false;
  }

  // Separate passes: offset and mask gradients own one (point, offset group) each, input
  // gradients one channel plane each, so neither needs atomics.
  template <int D, typename scalar_t>
  static void sampling_grads(const ConvGeometry<D>& geo, const scalar_t* input, const scalar_t* offset,
                             const scalar_t* mask, int64_t b0, int64_t n, const grad_column_t<scalar_t>* grad_columns,
                             scalar_t* grad_offset, scalar_t* grad_mask, at::opmath_type<scalar_t>* grad_input,
                             column_t<scalar_t>* columns) {
    if (columns) sample_columns(geo, input, offset, mask, b0, n, columns);
    if (grad_offset || grad_mask) position_grads(geo, input, offset, mask, b0, n, grad_columns, grad_offset, grad_mask);
    if (grad_input) input_grads(geo, offset, mask, b0, n, grad_columns, grad_input);
  }

  template <int D, typename scalar_t>
  static void sample_columns(const ConvGeometry<D>& geo, const scalar_t* input, const scalar_t* offset,
                             const scalar_t* mask, int64_t b0, int64_t n, column_t<scalar_t>* columns) {
    using acc_t = at::opmath_type<scalar_t>;
    const auto units = tile_units(geo);
    const int64_t per_group = geo.channels_per_offset_group();
    const int64_t channel_stride = geo.kernel_points * n * geo.out_plane;
    at::parallel_for(0, units.count(n), 1, [&](int64_t begin, int64_t end) {
      PointTile<D, scalar_t> tile;
      for (int64_t unit = begin; unit < end; ++unit) {
        int64_t b_local, g, tile_index;
        units.split(unit, b_local, g, tile_index);
        const int64_t b = b0 + b_local;
        tile.load(geo, offset, mask, b, g, tile_index * kTilePoints, b_local, n);
        for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
          const scalar_t* plane = input + (b * geo.in_channels + c) * geo.in_plane;
          column_t<scalar_t>* column = columns + c * channel_stride;
          for (int64_t t = 0; t < tile.count; ++t) {
            column[tile.column[t]] = tile.modulation[t] * interpolate<D, acc_t>(tile.stencil[t], plane);
          }
        }
      }
    });
  }

  template <int D, typename scalar_t>
  static void position_grads(const ConvGeometry<D>& geo, const scalar_t* input, const scalar_t* offset,
                             const scalar_t* mask, int64_t b0, int64_t n, const at::opmath_type<scalar_t>* grad_columns,
                             scalar_t* grad_offset, scalar_t* grad_mask) {
    using acc_t = at::opmath_type<scalar_t>;
    const auto units = tile_units(geo);
    const int64_t per_group = geo.channels_per_offset_group();
    const int64_t channel_stride = geo.kernel_points * n * geo.out_plane;
    const int64_t L = geo.out_plane;
    at::parallel_for(0, units.count(n), 1, [&](int64_t begin, int64_t end) {
      PointTile<D, scalar_t> tile;
      acc_t grad_pos[kTilePoints][D];
      acc_t grad_mod[kTilePoints];
      for (int64_t unit = begin; unit < end; ++unit) {
        int64_t b_local, g, tile_index;
        units.split(unit, b_local, g, tile_index);
        const int64_t b = b0 + b_local;
        const int64_t first_point = tile_index * kTilePoints;
        tile.load(geo, offset, mask, b, g, first_point, b_local, n);
        for (int64_t t = 0; t < tile.count; ++t) {
          grad_mod[t] = 0;
          for (int a = 0; a < D; ++a) grad_pos[t][a] = 0;
        }
        for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
          const scalar_t* plane = input + (b * geo.in_channels + c) * geo.in_plane;
          const acc_t* grad_column = grad_columns + c * channel_stride;
          for (int64_t t = 0; t < tile.count; ++t) {
            const acc_t grad = grad_column[tile.column[t]];
            acc_t dvalue[D];
            const acc_t value = interpolate_with_position_grad<D, acc_t>(tile.stencil[t], plane, dvalue);
            grad_mod[t] += grad * value;
            for (int a = 0; a < D; ++a) grad_pos[t][a] += grad * dvalue[a];
          }
        }
        for (int64_t t = 0; t < tile.count; ++t) {
          const int64_t k = (first_point + t) / L;
          const int64_t l = (first_point + t) % L;
          const int64_t row = point_row(geo, b, g, k);
          if (grad_offset) {
            for (int a = 0; a < D; ++a) {
              grad_offset[(row * D + a) * L + l] = static_cast<scalar_t>(grad_pos[t][a] * tile.modulation[t]);
            }
          }
          if (grad_mask) grad_mask[row * L + l] = static_cast<scalar_t>(grad_mod[t]);
        }
      }
    });
  }

  // Units here are (local sample, offset group, channel block) so that no two threads write the
  // same grad_input plane; each unit walks all tiles of its sample and group.
  template <int D, typename scalar_t>
  static void input_grads(const ConvGeometry<D>& geo, const scalar_t* offset, const scalar_t* mask, int64_t b0,
                          int64_t n, const at::opmath_type<scalar_t>* grad_columns,
                          at::opmath_type<scalar_t>* grad_input) {
    using acc_t = at::opmath_type<scalar_t>;
    const auto units = tile_units(geo);
    const int64_t per_group = geo.channels_per_offset_group();
    const int64_t channel_stride = geo.kernel_points * n * geo.out_plane;
    // Enough channel blocks to keep every thread busy; fewer blocks reuse each stencil more.
    const int64_t wanted_units = 4 * at::get_num_threads();
    const int64_t blocks = std::clamp<int64_t>((wanted_units + n * geo.offset_groups - 1) / (n * geo.offset_groups), 1, per_group);
    const int64_t block_channels = (per_group + blocks - 1) / blocks;
    at::parallel_for(0, n * geo.offset_groups * blocks, 1, [&](int64_t begin, int64_t end) {
      PointTile<D, scalar_t> tile;
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t block = unit % blocks;
        const int64_t g = (unit / blocks) % geo.offset_groups;
        const int64_t b_local = unit / (blocks * geo.offset_groups);
        const int64_t c_begin = g * per_group + block * block_channels;
        const int64_t c_end = std::min(c_begin + block_channels, (g + 1) * per_group);
        for (int64_t tile_index = 0; tile_index < units.tiles; ++tile_index) {
          tile.load(geo, offset, mask, b0 + b_local, g, tile_index * kTilePoints, b_local, n);
          for (int64_t c = c_begin; c < c_end; ++c) {
            acc_t* plane = grad_input + (b_local * geo.in_channels + c) * geo.in_plane;
            const acc_t* grad_column = grad_columns + c * channel_stride;
            for (int64_t t = 0; t < tile.count; ++t) {
              const acc_t grad = grad_column[tile.column[t]] * tile.modulation[t];
              for (int corner = 0; corner < Stencil<D, acc_t>::kCorners; ++corner) {
                // Skip outside corners: a non-finite gradient times their zero weight would put
                // NaN into element 0.
                if (tile.stencil[t].inside[corner]) {
                  plane[tile.stencil[t].index[corner]] += grad * tile.stencil[t].weight[corner];
                }
              }
            }
          }
        }
      }
    });
  }
};

}  // namespace
}  // namespace dcnlab

TORCH_LIBRARY_IMPL(dcnlab, CPU, m) {
  m.impl("deform_conv", &dcnlab::deform_conv_forward<dcnlab::CpuSampler>);
  m.impl("deform_conv_backward", &dcnlab::deform_conv_backward<dcnlab::CpuSampler>);
}
