// The schedule on the device (docs/spec.md §2): how a step's first kernel writes the step's row
// from the table of every t, and how the other kernels read that row. Shared by the CPU ops and
// the CUDA kernels; mgpp_kernels/backends/triton/kernels.py does the same. A null `current` is
// the host schedule: the step counts, prunes when its event kernels are called and freezes when
// given masks, with the prior of the group's scalars.
#pragma once

#include "layout.h"
#include "platform.h"
#include "step.h"

namespace MGPP_NAMESPACE {

// Copies row min(t, rows − 1) of `table` (t = *position) into `current`, with k = 0 and the skip
// flag set when found_inf is given and nonzero (NaN included), and advances t unless skipped.
MGPP_HD void write_step_row(const double* table, int64_t rows, int64_t* position,
                            const float* found_inf, double* current) {
  const int64_t t = *position;
  const bool skip = found_inf != nullptr && *found_inf != 0.0f;
  const double* row = table + (t < rows - 1 ? t : rows - 1) * kNumScheduleColumns;
  for (int j = 0; j < kNumScheduleColumns; ++j) current[j] = row[j];
  if (skip) current[kScheduleK] = 0.0;
  current[kCurrentSkip] = skip ? 1.0 : 0.0;
  *position = skip ? t : t + 1;
}

// A skipped step (GradScaler found an inf): nothing moves, the step counts included.
MGPP_HD bool step_skipped(const double* current) {
  return current != nullptr && current[kCurrentSkip] != 0.0;
}

// Whether the event's kernels prune at this step (on the device schedule: k != 0).
MGPP_HD bool step_prunes(const double* current) {
  return current == nullptr || current[kScheduleK] != 0.0;
}

// Whether an event writes the keep masks it is given (on the device schedule: at the freeze only,
// since every candidate holds an all-ones mask before it).
MGPP_HD bool step_freezes(const double* current) {
  return current == nullptr || current[kScheduleFreeze] != 0.0;
}

// Whether a group's prior is on at this step: on in its scalars (a candidate group with the prior),
// and on the device schedule also at this t.
MGPP_HD bool step_prior_on(const double* scalars, const double* current) {
  return scalars[kPriorOn] != 0.0 && (current == nullptr || current[kSchedulePriorOn] != 0.0);
}

// The group's prior constants, with c1 of this t on the device schedule (the scalars then hold
// 0 in its place).
MGPP_HD PriorConstants step_prior(const double* scalars, const double* current) {
  PriorConstants prior = prior_constants(scalars);
  if (current != nullptr) prior.c1 = static_cast<float>(current[kScheduleC1]);
  return prior;
}

}  // namespace MGPP_NAMESPACE
