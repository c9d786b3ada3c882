// The bias gradient on CUDA: grad_bias[c] = sum over samples and positions of grad_output[b][c][p],
// accumulated in opmath (fp32 for half types, fp64 for double) and rounded once; deterministic
// (every element has a fixed thread, every sum a fixed order): bitwise equal run to run on one
// GPU model (the split into runs follows the SM count, so another model may round differently).
//
// at::sum over dims (0, 2, ...) took 33 us for the 33.5 MB grad output of B32 C128 4096 (about 4x
// its bandwidth floor) and 29 us for the 6.4 MB of B32 C512 14x14 on H200 (docs/perf-notes.md,
// session 8). Here a channel's B rows of P contiguous elements are cut into `splits` equal runs of
// vectors (16-byte loads where P and the pointer allow), one block per (channel, run), so that a
// few blocks per SM stream the tensor; a second launch adds the runs' partial sums in order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>

namespace dcnlab {
namespace bias_grad {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // independent loads in flight per thread

template <typename T, int V>
struct alignas(V * sizeof(T)) Vec {
  T v[V];
};

// Block (c, s) sums run s of channel c: vectors [s * per_run, (s + 1) * per_run) of the channel's
// B * Q vectors (Q = P / V per row) into partial[s][c], or, with one run, into out[c] directly.
template <int V, typename T>
__global__ void __launch_bounds__(kThreads)
    channel_sums_kernel(const T* __restrict__ grad, int64_t channels, int64_t plane, int64_t vectors,
                        int64_t per_run, at::opmath_type<T>* __restrict__ partial, T* __restrict__ out) {
  using acc_t = at::opmath_type<T>;
  const int64_t c = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t row_vectors = plane / V;
  const int64_t begin = s * per_run;
  const int64_t end = std::min<int64_t>(vectors, begin + per_run);
  acc_t acc[kUnroll] = {};
  // Vector j's (row b, vector q in the row), stepped by kThreads without a division per load: with
  // a 64-bit division per load and four blocks per SM the kernel took 24.5 instead of 13.4 us in
  // the fwd+bwd of B32 C128 4096 k9 on H200 (docs/perf-notes.md, session 11).
  const int64_t step_rows = kThreads / row_vectors;
  const int64_t step_vectors = kThreads % row_vectors;
  int64_t b = (begin + threadIdx.x) / row_vectors;
  int64_t q = begin + threadIdx.x - b * row_vectors;
  for (int64_t j0 = begin + threadIdx.x; j0 < end; j0 += kThreads * kUnroll) {
    Vec<T, V> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (j0 + u * kThreads < end) {
        loaded[u] = *reinterpret_cast<const Vec<T, V>*>(grad + (b * channels + c) * plane + q * V);
      }
      b += step_rows;
      q += step_vectors;
      if (q >= row_vectors) {
        q -= row_vectors;
        ++b;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (j0 + u * kThreads < end) {
        for (int v = 0; v < V; ++v) acc[u] += static_cast<acc_t>(loaded[u].v[v]);
      }
    }
  }
  acc_t sum = 0;
  for (int u = 0; u < kUnroll; ++u) sum += acc[u];
  for (int delta = 16; delta > 0; delta /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, delta);
  __shared__ acc_t warp_sums[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    if (partial) {
      partial[s * channels + c] = total;
    } else {
      out[c] = static_cast<T>(total);
    }
  }
}

// out[c] = the sum over s of partial[s][c], in order of s.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sum_runs_kernel(const at::opmath_type<T>* __restrict__ partial, int64_t channels, int64_t runs, T* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= channels) return;
  at::opmath_type<T> total = 0;
  for (int64_t s = 0; s < runs; ++s) total += partial[s * channels + c];
  out[c] = static_cast<T>(total);
}

// The bias gradient of grad_output (B, C, *spatial), in grad_output's dtype.
inline at::Tensor compute(const at::Tensor& grad_output_arg) {
  const auto grad_output = grad_output_arg.contiguous();
  const int64_t batch = grad_output.size(0);
  const int64_t channels = grad_output.size(1);
  const int64_t plane = batch * channels > 0 ? grad_output.numel() / (batch * channels) : 0;
  auto out = at::empty({channels}, grad_output.options());
  if (channels == 0) return out;
  if (batch == 0 || plane == 0) return out.zero_();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "dcnlab::bias_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* grad = grad_output.const_data_ptr<scalar_t>();
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t vectors = batch * (plane / V);
      // About eight blocks per SM in all (four before session 11: 12.0 -> 11.7 us for a cold 33.6 MB
      // in a microbenchmark), each with at least 8 vectors per thread.
      const int64_t target_blocks = 8 * int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
      const int64_t runs = std::clamp<int64_t>(
          std::min((target_blocks + channels - 1) / channels, vectors / (kThreads * 8)), 1, 65535);
      const int64_t per_run = (vectors + runs - 1) / runs;
      at::Tensor partial;
      if (runs > 1) partial = at::empty({runs, channels}, grad_output.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      acc_t* partial_ptr = runs > 1 ? partial.mutable_data_ptr<acc_t>() : nullptr;
      scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
      channel_sums_kernel<V, scalar_t><<<dim3(static_cast<unsigned>(channels), static_cast<unsigned>(runs)), kThreads, 0,
                                         stream>>>(grad, channels, plane, vectors, per_run, partial_ptr, out_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (runs > 1) {
        const auto blocks = static_cast<unsigned>((channels + kThreads - 1) / kThreads);
        sum_runs_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(partial_ptr, channels, runs, out_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    // The widest vector (up to 16 bytes) that divides a row and the pointer's alignment.
    constexpr int kMaxV = 16 / sizeof(scalar_t);
    const auto address = reinterpret_cast<uintptr_t>(grad);
    int width = kMaxV;
    while (width > 1 && (plane % width != 0 || address % (width * sizeof(scalar_t)) != 0)) width /= 2;
    if constexpr (kMaxV >= 8) {
      if (width == 8) return launch(std::integral_constant<int, 8>());
    }
    if constexpr (kMaxV >= 4) {
      if (width == 4) return launch(std::integral_constant<int, 4>());
    }
    if (width == 2) return launch(std::integral_constant<int, 2>());
    launch(std::integral_constant<int, 1>());
  });
  return out;
}

// out[c] = the sum over s of partial[s][c] for many runs (hundreds to thousands): a block of 32 x 32
// threads per 32 channels, thread row r adding runs r, r + 32, ... in order, then row 0 adding the
// 32 row sums in order; fixed order, so deterministic.
template <typename T>
__global__ void __launch_bounds__(1024)
    sum_many_runs_kernel(const at::opmath_type<T>* __restrict__ partial, int64_t channels, int64_t runs,
                         T* __restrict__ out) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t rows[32][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  acc_t total = 0;
  if (c < channels) {
    for (int64_t s = threadIdx.y; s < runs; s += 32) total += partial[s * channels + c];
  }
  rows[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    acc_t sum = 0;
    for (int r = 0; r < 32; ++r) sum += rows[r][threadIdx.x];
    out[c] = static_cast<T>(sum);
  }
}

// The sum over s of partial (runs, channels) in opmath (deterministic), as a (channels) tensor of
// dtype `out_dtype`: for partial sums computed elsewhere (the fused backward's per-tile sums of its
// grad-output tiles).
inline at::Tensor sum_partials(const at::Tensor& partial, at::ScalarType out_dtype) {
  TORCH_INTERNAL_ASSERT(partial.dim() == 2 && partial.is_contiguous() && partial.scalar_type() == at::toOpMathType(out_dtype));
  const int64_t channels = partial.size(1);
  auto out = at::empty({channels}, partial.options().dtype(out_dtype));
  if (channels == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dcnlab::bias_grad::sum_partials", [&] {
    const auto blocks = static_cast<unsigned>((channels + 31) / 32);
    sum_many_runs_kernel<scalar_t><<<blocks, dim3(32, 32), 0, at::cuda::getCurrentCUDAStream()>>>(
        partial.const_data_ptr<at::opmath_type<scalar_t>>(), channels, partial.size(0), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace bias_grad
}  // namespace dcnlab
