// The CUDA launchers of launch.h: the kernel bodies of kernels.cuh run as phased kernels on the
// caller's stream. No torch here; build with the nvcc flags of csrc/compile_flags.txt (never
// --use_fast_math; --fmad=false so that the device rounds as the CPU kernels do).
#include <cuda_runtime.h>

// The kernels' argument tables (up to 32 KiB, kernels.cuh) need CUDA 12.1; setup.py and
// CMakeLists.txt check the same before they build.
#if __CUDACC_VER_MAJOR__ < 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ < 1)
#error "the mgpp CUDA kernels need nvcc 12.1 or newer: their 32 KB kernel argument tables need it"
#endif

#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.cuh"
#include "launch.h"
#include "plan.h"

namespace MGPP_NAMESPACE {
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

}  // namespace

void fused_step(const StepTensor* tensors, int64_t count, const StepLaunch& launch) {
  dispatch_step_dtypes(launch.param_dtype, launch.state_dtype, [&](auto param, auto state) {
    fused_step_typed<decltype(param), decltype(state)>(tensors, count, launch);
  });
}

void abs_histogram(const ValueTensor* tensors, int64_t count, DType dtype, int level,
                   const int64_t* selection, int64_t* histogram, const double* current,
                   void* stream, Pattern pattern) {
  const size_t counter_bytes = shared_histogram_bytes(level == 0 ? kHistHighBins : kHistLowBins);
  dispatch_dtype(dtype, [&](auto format) {
    using Kernel = HistogramKernel<decltype(format)>;
    const HistogramMode mode = histogram_mode<Kernel>(counter_bytes);
    const auto launches = plan_histogram(tensors, count, level, selection, histogram, current, mode,
                                         pattern_chunk_size(pattern), HistogramArgs::kMaxTensors,
                                         pattern);
    launch_all<Kernel>(launches, mode == kSharedHistogram ? counter_bytes : 0, as_stream(stream));
  });
}

void radix_select(const int64_t* histogram, int level, int64_t* selection, const double* current,
                  void* stream) {
  if (level != 0 && level != 1) throw std::invalid_argument("mgpp: level must be 0 or 1");
  phased_kernel<SelectKernel><<<1, kSelectThreads, 0, as_stream(stream)>>>(
      SelectArgs{histogram, selection, level, current});
  check(cudaGetLastError(), "kernel launch");
}

void apply_threshold(const ValueTensor* tensors, uint8_t* const* keep_masks, int64_t count,
                     DType dtype, const int64_t* selection, const double* current, void* stream,
                     Pattern pattern) {
  dispatch_dtype(dtype, [&](auto format) {
    using Kernel = ThresholdKernel<decltype(format)>;
    launch_all<Kernel>(plan_threshold(tensors, keep_masks, count, selection, current,
                                      pattern_chunk_size(pattern), ThresholdArgs::kMaxTensors,
                                      pattern),
                       0, as_stream(stream));
  });
}

void schedule_step(const double* table, int64_t rows, int64_t* position, const float* found_inf,
                   double* current, void* stream) {
  phased_kernel<ScheduleKernel><<<1, ScheduleKernel::kMaxThreads, 0, as_stream(stream)>>>(
      ScheduleArgs{table, rows, position, found_inf, current});
  check(cudaGetLastError(), "kernel launch");
}

std::string build_info() {
  std::string info = "cuda kernels: CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
                     std::to_string(CUDART_VERSION % 1000 / 10) + ", nvcc " +
                     std::to_string(__CUDACC_VER_MAJOR__) + "." +
                     std::to_string(__CUDACC_VER_MINOR__) + "." +
                     std::to_string(__CUDACC_VER_BUILD__);
  // __CUDA_ARCH_LIST__ is the list of targets, e.g. 800,900.
  for (const int arch : {__CUDA_ARCH_LIST__}) info += ", sm_" + std::to_string(arch / 10);
  return info;
}

int driver_version() {
  int version = 0;
  check(cudaDriverGetVersion(&version), "cudaDriverGetVersion");
  return version;
}

}  // namespace cuda
}  // namespace MGPP_NAMESPACE
