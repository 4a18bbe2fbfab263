# ctest cuda_ptx: the PTX of csrc/cuda/launch.cu keeps the rounding recipe of csrc/core/step.h
# on the device. Every float32 add, subtract and multiply carries .rn (which ptxas never fuses
# into an FMA), and no float32 FMA, approximate division or square root, or flush-to-zero appears.
# Usage: cmake -DPTX=<file.ptx> -P check_ptx.cmake
file(READ "${PTX}" ptx)
string(REGEX MATCHALL "[a-z]+(\\.[a-z0-9]+)*\\.f32" instructions "${ptx}")
set(forbidden "")
set(rounded 0)
foreach(instruction IN LISTS instructions)
  if(instruction MATCHES "^(add|sub|mul)\\.f32$" OR instruction MATCHES "^(fma|mad)\\."
     OR instruction MATCHES "\\.(approx|full|ftz)\\.")
    list(APPEND forbidden "${instruction}")
  elseif(instruction MATCHES "^(add|sub|mul)\\.rn\\.f32$")
    math(EXPR rounded "${rounded} + 1")
  endif()
endforeach()
list(REMOVE_DUPLICATES forbidden)
if(forbidden)
  message(FATAL_ERROR "${PTX}: float32 instructions outside the rounding recipe: ${forbidden}")
endif()
if(rounded LESS 100)
  message(FATAL_ERROR "${PTX}: only ${rounded} add/sub/mul.rn.f32 instructions: not the kernels?")
endif()
message(STATUS "${rounded} float32 add/sub/mul.rn, no FMA or approximate float32 math")
