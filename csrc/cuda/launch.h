// The launcher API of the CUDA kernels: raw device pointers in, kernels queued on a stream out.
// No torch and no CUDA runtime types here, so that the torch op layer (csrc/ops/cuda.cpp) and the
// host-only tests include it with any C++ compiler. Nothing here waits for the device.
#pragma once

#include <stdint.h>

#include <string>

#include "../core/formats.h"

namespace MGPP_NAMESPACE {
namespace cuda {

// One tensor of a fused step; every pointer is device memory with `numel` contiguous elements.
struct StepTensor {
  void* param;
  const void* grad;          // the parameter's dtype
  void* exp_avg;             // the state dtype
  void* exp_avg_sq;
  const uint8_t* keep_mask;  // frozen mask, bit i%8 of byte i/8 set = keep; null before the freeze
  const float* step;         // the tensor's step count, this step included
  int64_t numel;
};

struct StepLaunch {
  DType param_dtype;
  DType state_dtype;         // float32 or param_dtype
  const double* scalars;     // kNumStepScalars float64 in StepScalar order (csrc/core/layout.h)
  const float* grad_scale;   // one float32; gradients are divided by it; null without a GradScaler
  int64_t* high_histogram;   // kHistHighBins counters to add |θ_new|'s level-0 bins to, or null
  const double* current;     // the step's row of the device schedule (csrc/core/schedule.h), or
                             // null: the host schedule
  void* stream;              // cudaStream_t
};

// Prior gradient + AdamW + frozen mask for every tensor (one dtype pair) in one pass. Throws
// std::invalid_argument on an unknown dtype or a state dtype the kernels do not take.
//
// Every launcher below takes `current`, the step's row of the device schedule (device memory), or
// null: with it the kernels read on the device whether the step is skipped, prunes or freezes
// and the prior's c1 and on/off (csrc/core/schedule.h), so a step's launches do not depend on t.
void fused_step(const StepTensor* tensors, int64_t count, const StepLaunch& launch);

// Adds the radix histogram of |x| over the tensors: level 0 counts key_high_bin over all
// elements (kHistHighBins counters); level 1 counts key_low_bin of the elements whose high bin is
// key_high_bin(selection[kSelKey]) (kHistLowBins counters). Under an N:M `pattern`, each group's
// non-candidates count as kNotCandidateKey (csrc/core/selection.h).
void abs_histogram(const ValueTensor* tensors, int64_t count, DType dtype, int level,
                   const int64_t* selection, int64_t* histogram, const double* current,
                   void* stream, Pattern pattern = {});

// One radix selection level on the device: the same result as select_bin (csrc/core/selection.h).
void radix_select(const int64_t* histogram, int level, int64_t* selection, const double* current,
                  void* stream);

// Zeroes |x| < τ (τ's key is selection[kSelKey]; under an N:M `pattern`, each group's
// candidates at or below τ); when keep_masks is not null, also writes each tensor's packed keep
// mask (ceil(numel/8) bytes). On the device schedule the masks are written at the freeze only.
void apply_threshold(const ValueTensor* tensors, uint8_t* const* keep_masks, int64_t count,
                     DType dtype, const int64_t* selection, const double* current, void* stream,
                     Pattern pattern = {});

// The first launch of a step on the device schedule (one thread): write_step_row from `table`
// (rows × kNumScheduleColumns float64) at t = *position into `current`, skipping when found_inf
// (one float32, or null) is nonzero.
void schedule_step(const double* table, int64_t rows, int64_t* position, const float* found_inf,
                   double* current, void* stream);

// "cuda kernels: CUDA <runtime version>, nvcc <version>, sm_<each arch>", as built.
std::string build_info();

// The CUDA version the installed driver supports, as cudaDriverGetVersion encodes it
// (1000 · major + 10 · minor; 0 without a driver).
int driver_version();

// The kernel argument tables of fused_step, abs_histogram and apply_threshold take up to 32 KB,
// which drivers take from CUDA 12.1 on (older ones take 4 KB).
constexpr int kMinDriverVersion = 12010;

}  // namespace cuda
}  // namespace MGPP_NAMESPACE
