// The instruction sets the CPU kernels' intrinsics paths use in this build (csrc/cpu/convert.h,
// csrc/cpu/compact.h), from the -march target each copy of csrc/cpu/kernels.cpp is compiled for.
#pragma once

// The AVX-512 paths use the BW, DQ and VL subsets (16-bit lanes, vfpclassps, 256-bit masked
// moves) too.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define MGPP_CPU_AVX512 1
#endif
#if defined(MGPP_CPU_AVX512) || defined(__F16C__) || defined(__AVX2__)
// GCC 12 reports the intrinsics' deliberately undefined pass-through operands as (maybe)
// uninitialized once inlined (a known false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
