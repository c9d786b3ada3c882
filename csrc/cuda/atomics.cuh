// Vector atomics shared by the CUDA kernels.
#pragma once

#include <type_traits>

namespace dcnlab {

// grad_input[target + v] += values[v] for the V channels of a pack. On Hopper a pack of four
// floats is one vector atomic; elsewhere it is V scalar ones.
template <int V, typename acc_t>
__device__ __forceinline__ void atomic_add_pack(acc_t* target, const acc_t (&values)[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = std::is_same_v<acc_t, float> && V == 4;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
    // A reduction (no value returned), spelled out: from atomicAdd(float4*), whose result is
    // unused, ptxas emitted ATOM instead of RED in the paired sampling-gradient kernels once
    // their addresses became 32-bit offsets from a base in registers.
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(target), "f"(values[0]), "f"(values[1]),
                 "f"(values[2]), "f"(values[3])
                 : "memory");
  } else {
    for (int v = 0; v < V; ++v) atomicAdd(target + v, values[v]);
  }
}

// atomic_add_pack of four floats under a predicate: on Hopper a predicated vector reduction in the
// PTX (`target` must be a valid address either way; ptxas may still branch around it, as it does
// in sampling_grads_paired_body, where a plain `if` around atomic_add_pack still comes out 8
// instructions longer in 2D), elsewhere a branch.
__device__ __forceinline__ void atomic_add_pack_if(float* target, const float (&values)[4], bool add) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %5, 0;\n\t"
      "@p red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n\t}" ::"l"(target),
      "f"(values[0]), "f"(values[1]), "f"(values[2]), "f"(values[3]), "r"(static_cast<int>(add))
      : "memory");
#else
  if (add) atomic_add_pack<4>(target, values);
#endif
}

// *target += value: one vector atomic on Hopper, two scalar ones elsewhere.
__device__ __forceinline__ void atomic_add_pair(float2* target, float2 value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(target, value);
#else
  atomicAdd(&target->x, value.x);
  atomicAdd(&target->y, value.y);
#endif
}

}  // namespace dcnlab
