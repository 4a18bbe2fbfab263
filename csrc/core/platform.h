// What every shared header needs: the namespace, the host/device qualifier and float bit casts.
// nvcc and the host compilers compile everything under csrc/core.
#pragma once

#include <stdint.h>

#if !defined(__CUDA_ARCH__)
#include <string.h>
#endif

// The namespace of the shared math and the kernels. csrc/tests/test_cpu_arch.cpp builds the CPU
// kernels twice under other names (-DMGPP_NAMESPACE=...) to link two -march builds into one test.
#ifndef MGPP_NAMESPACE
#define MGPP_NAMESPACE mgpp
#endif
// The plain structs and enums of the kernels' interfaces (formats.h's DType and ValueTensor,
// step.h's PriorConstants and AdamWScalars, csrc/cpu/kernels.h's StepTensor, StepOptions and
// PrunedTensor) are declared in namespace mgpp_abi whatever MGPP_NAMESPACE is, and named into
// MGPP_NAMESPACE by using-declarations: every build of the CPU kernels (one per instruction set,
// csrc/cpu/dispatch.h) then takes the same argument types, so that one table calls them all.
// Types carry no code; the functions stay in MGPP_NAMESPACE, so that the inline functions of
// builds for different instruction sets never merge at link time.

#if defined(__CUDACC__)
#define MGPP_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
// Always inlined on the host too: a call left inside a `#pragma omp simd` loop (GCC stops
// inlining in large kernels) keeps the loop from vectorising.
#define MGPP_HD inline __attribute__((always_inline))
#else
#define MGPP_HD inline
#endif

namespace MGPP_NAMESPACE {

MGPP_HD uint32_t float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(uint32_t, x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

MGPP_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(float, u);
#else
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

}  // namespace MGPP_NAMESPACE
