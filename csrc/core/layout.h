// The data layout shared by the op layer, the kernels and Python: the order of the step scalars,
// the radix bins, the selection slots and the device schedule's columns. mgpp_kernels/ops/layout.py holds the Python copy and
// checks it at import against torch.ops.mgpp.layout(), which csrc/ops/schema.cpp generates from
// the lists below.
#pragma once

#include "platform.h"

// The float64 scalars tensor of one fused step, in this order: X(enumerator, name in layout()).
// It lives on the parameters' device so that GPU kernels read lr and λ_t's constants from memory.
// prior_on is 1 while the prior is on, else 0; c1, c2, 1/n, 1/σ0², 1/σ1² are docs/spec.md §2's.
#define MGPP_STEP_SCALARS(X)          \
  X(kLr, lr)                          \
  X(kBeta1, beta1)                    \
  X(kBeta2, beta2)                    \
  X(kEps, eps)                        \
  X(kWeightDecay, weight_decay)       \
  X(kPriorOn, prior_on)               \
  X(kPriorC1, c1)                     \
  X(kPriorC2, c2)                     \
  X(kPriorInvN, inv_n)                \
  X(kPriorInvSigma0Sq, inv_sigma0_sq) \
  X(kPriorInvSigma1Sq, inv_sigma1_sq)

// The int64 state of the radix selection of τ, the k-th smallest key (csrc/core/selection.h):
//   rank:  1-indexed rank of τ among the keys still in play (starts at k),
//   key:   τ's key bits fixed so far (after the last level: τ's key),
//   below: number of keys known to be smaller than τ,
//   equal: the keys in the bin the last level chose (after the last level: the keys equal to τ,
//          which an N:M pool's event zeroes too).
// It lives in memory (on the device for the GPU backends) so that no step reads it on the host.
#define MGPP_SELECTION_SLOTS(X) \
  X(kSelRank, rank)             \
  X(kSelKey, key)               \
  X(kSelBelow, below)           \
  X(kSelEqual, equal)

// The schedule on the device (docs/spec.md §2; csrc/core/schedule.h): a float64 table of one row
// per schedule position t in these columns, and the step's row ("current") copied from it, the
// skip flag after the columns:
//   prior_on: 1 while the prior is on, else 0;   c1: λ_t's constant;
//   k: the event's rank (0: no event this step);  freeze: 1 at the event that freezes the mask;
//   skip (current only): 1 when GradScaler's found_inf is nonzero (then k is 0).
#define MGPP_SCHEDULE_COLUMNS(X) \
  X(kSchedulePriorOn, prior_on)  \
  X(kScheduleC1, c1)             \
  X(kScheduleK, k)               \
  X(kScheduleFreeze, freeze)

namespace MGPP_NAMESPACE {

#define MGPP_ENUMERATOR(enumerator, name) enumerator,
enum StepScalar : int { MGPP_STEP_SCALARS(MGPP_ENUMERATOR) kNumStepScalars };
enum SelectionSlot : int { MGPP_SELECTION_SLOTS(MGPP_ENUMERATOR) kNumSelectionSlots };
enum ScheduleColumn : int { MGPP_SCHEDULE_COLUMNS(MGPP_ENUMERATOR) kNumScheduleColumns };
#undef MGPP_ENUMERATOR
constexpr int kCurrentSkip = kNumScheduleColumns;
constexpr int kNumCurrentSlots = kNumScheduleColumns + 1;

// The radix histogram of |θ|'s float32 key (bit 31, the sign, is never set): level 0 counts key
// bits 30..15, level 1 bits 14..0.
constexpr int kHistHighBits = 16;
constexpr int kHistLowBits = 15;
constexpr uint32_t kHistHighBins = 1u << kHistHighBits;
constexpr uint32_t kHistLowBins = 1u << kHistLowBits;

}  // namespace MGPP_NAMESPACE
