// torch.ops.mgpp: the op schemas and the module that registers them. The kernels' implementations
// are registered apart, per device: csrc/ops/cpu.cpp and csrc/ops/cuda.cpp.
// pybind11 from torch's include directory, not <torch/extension.h>: the module needs nothing more,
// and torch/extension.h would cost this file most of a minute to compile.
#include <pybind11/pybind11.h>

#include <string>

#include <torch/library.h>

#include "../core/formats.h"
#include "../core/layout.h"
#include "../cpu/kernels.h"
#if defined(MGPP_WITH_CUDA)
#include "../cuda/launch.h"
#endif

namespace mgpp {
namespace {

// The layout of csrc/core/layout.h and the dtype codes of csrc/core/formats.h as
// mgpp_kernels/ops/layout.py checks it at import: "step_scalars=lr,beta1,...;high_bins=65536;
// low_bins=32768;selection=rank,key,below,equal;schedule=prior_on,c1,k,freeze;
// dtypes=float32,bfloat16,float16".
std::string layout() {
#define MGPP_NAME(enumerator, name) "," #name
  const std::string step_scalars = MGPP_STEP_SCALARS(MGPP_NAME);
  const std::string selection = MGPP_SELECTION_SLOTS(MGPP_NAME);
  const std::string schedule = MGPP_SCHEDULE_COLUMNS(MGPP_NAME);
  const std::string dtypes = MGPP_KERNEL_DTYPES(MGPP_NAME);
#undef MGPP_NAME
  // Each list starts with the separator of its first name.
  return "step_scalars=" + step_scalars.substr(1) + ";high_bins=" + std::to_string(kHistHighBins) +
         ";low_bins=" + std::to_string(kHistLowBins) + ";selection=" + selection.substr(1) +
         ";schedule=" + schedule.substr(1) + ";dtypes=" + dtypes.substr(1);
}

std::string build_info() {
#if defined(MGPP_WITH_CUDA)
  return cpu::build_info() + "; " + cuda::build_info();
#else
  return cpu::build_info();
#endif
}

}  // namespace

TORCH_LIBRARY(mgpp, m) {
  // The typed wrappers and the fake implementations of these ops live in mgpp_kernels.ops.
  m.set_python_module("mgpp_kernels.ops");
  m.def("layout() -> str", &layout);
  m.def("build_info() -> str", &build_info);
  // `current` (optional, float64, layout.h's kNumCurrentSlots): the step's row of the device
  // schedule, read by the kernels (csrc/core/schedule.h); none: the host schedule.
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] state_steps, Tensor[] keep_masks, Tensor scalars, "
      "Tensor? grad_scale, Tensor(e!)? histogram, Tensor? current=None, "
      "int[] pattern=[], int[] window=[]) -> ()");
  // `pattern` (the event ops, and fused_step_'s histogram): [N, M] for an N:M pool, whose
  // candidates are the M − N smallest |x| of each group of M along the last dimension and whose
  // event zeroes those at τ too (csrc/core/selection.h); empty for an unstructured pool.
  // fused_step_'s `window` (cpu only): [begin, end), the high bins its histogram counts one by
  // one, the elements below in bin begin − 1 and those above in bin end (csrc/cpu/kernels.h's
  // HighBinWindow); empty: every bin.
  m.def(
      "abs_histogram_(Tensor[] tensors, Tensor(a!) histogram, Tensor selection, int level, "
      "Tensor? current=None, int[] pattern=[]) -> ()");
  m.def(
      "radix_select_(Tensor histogram, Tensor(a!) selection, int level, "
      "Tensor? current=None) -> ()");
  m.def(
      "apply_threshold_(Tensor(a!)[] tensors, Tensor(b!)[] keep_masks, Tensor selection, "
      "Tensor? current=None, int[] pattern=[]) -> ()");
  // The first op of a step on the device schedule: writes `current` from row t = position of
  // `table` and advances position unless found_inf is nonzero.
  m.def(
      "schedule_step_(Tensor table, Tensor(a!) position, Tensor(b!) current, "
      "Tensor? found_inf) -> ()");
  // The one-pass pruning of an event (CPU): partition_at_bin_, the level-1 selection over the
  // collected elements' histogram, then prune_collected_.
  m.def(
      "partition_at_bin_(Tensor(a!)[] tensors, Tensor(b!)[] keep_masks, Tensor selection, "
      "Tensor(c!) low_histogram, Tensor(d!) positions, int[] pattern=[]) -> ()");
  m.def(
      "prune_collected_(Tensor(a!)[] tensors, Tensor(b!)[] keep_masks, Tensor positions, "
      "Tensor selection, int[] pattern=[]) -> ()");
}

}  // namespace mgpp

// Importing mgpp_kernels._C runs the registrations of csrc/ops; the module itself is empty.
// setup.py's torch extension defines TORCH_EXTENSION_NAME as _C.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Registers the torch.ops.mgpp kernels (mgpp_kernels.ops wraps them).";
}
