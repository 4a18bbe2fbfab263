# ctest cuda_ptx: the PTX of csrc/cuda/launch.cu keeps csrc/core/step.h's math on the device
# (docs/spec.md §4): fused multiply-adds are allowed (step.h's mul_add is fma.rn.f32, and nvcc
# contracts others by default), but no approximate float32 division or square root and no
# flush-to-zero: AdamW's division and square root stay IEEE (div.rn, sqrt.rn).
# Usage: cmake -DPTX=<file.ptx> -P check_ptx.cmake
file(READ "${PTX}" ptx)
string(REGEX MATCHALL "[a-z]+(\\.[a-z0-9]+)*\\.f32" instructions "${ptx}")
set(forbidden "")
set(arithmetic 0)
set(fused 0)
foreach(instruction IN LISTS instructions)
  if(instruction MATCHES "\\.(approx|full|ftz)\\.")
    list(APPEND forbidden "${instruction}")
  elseif(instruction MATCHES "^(add|sub|mul)(\\.rn)?\\.f32$")
    math(EXPR arithmetic "${arithmetic} + 1")
  elseif(instruction MATCHES "^fma\\.rn\\.f32$")
    math(EXPR arithmetic "${arithmetic} + 1")
    math(EXPR fused "${fused} + 1")
  endif()
endforeach()
list(REMOVE_DUPLICATES forbidden)
if(forbidden)
  message(FATAL_ERROR "${PTX}: approximate or flush-to-zero float32 instructions: ${forbidden}")
endif()
if(arithmetic LESS 100 OR fused LESS 10)
  message(FATAL_ERROR "${PTX}: only ${arithmetic} float32 add/sub/mul/fma instructions, ${fused} "
                      "fma.rn.f32: not the kernels?")
endif()
if(NOT ptx MATCHES "div\\.rn\\.f32" OR NOT ptx MATCHES "sqrt\\.rn\\.f32")
  message(FATAL_ERROR "${PTX}: no div.rn.f32 or sqrt.rn.f32: AdamW's division and square root "
                      "must be IEEE")
endif()
message(STATUS "${arithmetic} float32 add/sub/mul/fma (${fused} fma.rn), IEEE division and square "
               "root, no approximate float32 math")
