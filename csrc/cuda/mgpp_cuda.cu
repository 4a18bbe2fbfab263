// The CUDA launchers of mgpp_cuda.h: the kernel bodies of kernels.cuh run as phased kernels on the
// caller's stream. No torch here; build without --use_fast_math, and with --fmad=false so that
// the device rounds as the CPU kernel does (built with -ffp-contract=off).
#include <cuda_runtime.h>

#include <string>

#include "kernels.cuh"
#include "mgpp_cuda.h"

namespace mgpp {
namespace cuda {
namespace {

struct DeviceThread {
  uint32_t* words;

  __device__ __forceinline__ int64_t block() const { return blockIdx.x; }
  __device__ __forceinline__ int thread() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int block_dim() const { return static_cast<int>(blockDim.x); }
  __device__ __forceinline__ uint32_t* shared_words() const { return words; }
  __device__ __forceinline__ void atomic_add_shared(uint32_t* word, uint32_t value) const {
    atomicAdd(word, value);
  }
  __device__ __forceinline__ void atomic_add_global(unsigned long long* counter,
                                                    unsigned long long value) const {
    atomicAdd(counter, value);
  }
  __device__ __forceinline__ Bytes16 load16(const void* address) const {
    const uint4 v = *static_cast<const uint4*>(address);
    return Bytes16{{v.x, v.y, v.z, v.w}};
  }
  __device__ __forceinline__ void store16(void* address, const Bytes16& value) const {
    *static_cast<uint4*>(address) = make_uint4(value.word[0], value.word[1], value.word[2], value.word[3]);
  }
};

template <class Kernel>
__global__ void __launch_bounds__(Kernel::kMaxThreads)
    phased_kernel(const __grid_constant__ typename Kernel::Args args) {
  extern __shared__ uint4 dynamic_shared[];
  __shared__ typename Kernel::BlockState state;
  const DeviceThread th{reinterpret_cast<uint32_t*>(dynamic_shared)};
#pragma unroll
  for (int p = 0; p < Kernel::kPhases; ++p) {
    if (p > 0) __syncthreads();
    Kernel::phase(p, th, args, state);
  }
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("mgpp: ") + what + ": " + cudaGetErrorString(status));
  }
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Shared-memory counters when the device lets a block hold them, else global atomics.
template <class Kernel>
HistogramMode histogram_mode(size_t shared_bytes) {
  int device = 0;
  int max_shared = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute");
  cudaFuncAttributes attributes{};
  check(cudaFuncGetAttributes(&attributes, phased_kernel<Kernel>), "cudaFuncGetAttributes");
  if (attributes.sharedSizeBytes + shared_bytes > static_cast<size_t>(max_shared)) {
    return kGlobalHistogram;
  }
  check(cudaFuncSetAttribute(phased_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(shared_bytes)),
        "cudaFuncSetAttribute");
  return kSharedHistogram;
}

template <class Kernel>
void launch_all(const std::vector<typename Kernel::Args>& launches, size_t shared_bytes,
                cudaStream_t stream) {
  for (const auto& args : launches) {
    const int blocks = args.first_block[args.num_tensors];
    phased_kernel<Kernel><<<blocks, Kernel::kMaxThreads, shared_bytes, stream>>>(args);
    check(cudaGetLastError(), "kernel launch");
  }
}

template <class P, class S>
void fused_step_typed(const StepTensor* tensors, int64_t count, const StepLaunch& launch) {
  using Kernel = FusedStepKernel<P, S>;
  const size_t counter_bytes = shared_histogram_bytes(kHistHighBins);
  const HistogramMode mode =
      launch.high_histogram != nullptr ? histogram_mode<Kernel>(counter_bytes) : kNoHistogram;
  const auto launches = plan_fused_step(tensors, count, launch, mode);
  launch_all<Kernel>(launches, mode == kSharedHistogram ? counter_bytes : 0, as_stream(launch.stream));
}

template <class Fn>
void dispatch_dtype(DType dtype, Fn fn) {
  switch (dtype) {
    case DType::Float32: fn(F32{}); return;
    case DType::BFloat16: fn(BF16{}); return;
    case DType::Float16: fn(F16{}); return;
  }
  throw std::invalid_argument("mgpp: unknown dtype");
}

}  // namespace

void fused_step(const StepTensor* tensors, int64_t count, const StepLaunch& launch) {
  if (launch.state_dtype != DType::Float32 && launch.state_dtype != launch.param_dtype) {
    throw std::invalid_argument("mgpp: the state dtype must be float32 or the parameter's dtype");
  }
  dispatch_dtype(launch.param_dtype, [&](auto param_format) {
    using P = decltype(param_format);
    if (launch.state_dtype == DType::Float32) {
      fused_step_typed<P, F32>(tensors, count, launch);
    } else {
      fused_step_typed<P, P>(tensors, count, launch);
    }
  });
}

void abs_histogram(const ValueTensor* tensors, int64_t count, DType dtype, int level,
                   const int64_t* selection, int64_t* histogram, void* stream) {
  const size_t counter_bytes = shared_histogram_bytes(level == 0 ? kHistHighBins : kHistLowBins);
  dispatch_dtype(dtype, [&](auto format) {
    using Kernel = HistogramKernel<decltype(format)>;
    const HistogramMode mode = histogram_mode<Kernel>(counter_bytes);
    const auto launches = plan_histogram(tensors, count, level, selection, histogram, mode);
    launch_all<Kernel>(launches, mode == kSharedHistogram ? counter_bytes : 0, as_stream(stream));
  });
}

void radix_select(const int64_t* histogram, int level, int64_t* selection, void* stream) {
  if (level != 0 && level != 1) throw std::invalid_argument("mgpp: level must be 0 or 1");
  phased_kernel<SelectKernel><<<1, kSelectThreads, 0, as_stream(stream)>>>(
      SelectArgs{histogram, selection, level});
  check(cudaGetLastError(), "kernel launch");
}

void apply_threshold(const ValueTensor* tensors, uint8_t* const* keep_masks, int64_t count,
                     DType dtype, const int64_t* selection, void* stream) {
  dispatch_dtype(dtype, [&](auto format) {
    using Kernel = ThresholdKernel<decltype(format)>;
    launch_all<Kernel>(plan_threshold(tensors, keep_masks, count, selection), 0, as_stream(stream));
  });
}

std::string build_info() {
  std::string info = "cuda kernels: CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
                     std::to_string(CUDART_VERSION % 1000 / 10);
#if defined(__CUDA_ARCH_LIST__)
  // __CUDA_ARCH_LIST__ is the list of targets, e.g. 800,900.
  for (const int arch : {__CUDA_ARCH_LIST__}) info += ", sm_" + std::to_string(arch / 10);
#endif
  return info;
}

}  // namespace cuda
}  // namespace mgpp
