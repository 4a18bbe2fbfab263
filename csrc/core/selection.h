// The exact global threshold τ (docs/spec.md §3): ranking keys and the radix selection of the k-th
// smallest one from histograms, shared by the CPU and CUDA kernels.
#pragma once

#include "formats.h"
#include "layout.h"
#include "platform.h"

namespace MGPP_NAMESPACE {

// For non-negative IEEE floats the bit pattern orders like the value, so |θ| is ranked by its
// float32 bits without the sign. Every storage format converts to float32 exactly, so one key
// space ranks tensors of mixed dtypes. NaN keys sort above +inf, as NaN does in torch.kthvalue.
constexpr uint32_t kNaNKeyFloor = 0x7F800001u;

MGPP_HD uint32_t abs_key(float x) { return float_to_bits(x) & 0x7FFFFFFFu; }
MGPP_HD uint32_t key_high_bin(uint32_t key) { return key >> kHistLowBits; }
MGPP_HD uint32_t key_low_bin(uint32_t key) { return key & (kHistLowBins - 1u); }

// |θ| < τ in key space, or |θ| <= τ where `at_tau` (an N:M pool's rule). Comparisons with a NaN
// τ are false, as in torch.
MGPP_HD bool below_threshold(uint32_t key, uint32_t tau_key, bool at_tau = false) {
  return key < tau_key + (at_tau ? 1u : 0u) && tau_key < kNaNKeyFloor;
}

// The key of an element that an N:M pool's event does not rank (not among the M − N smallest of
// its group): the largest key, a NaN's, which no selection reaches since k never exceeds the
// pool's candidates, unless τ is itself that NaN, which no comparison puts anything below or at.
constexpr uint32_t kNotCandidateKey = 0x7FFFFFFFu;

// The keys of one group of M consecutive elements, `keys[0..m)`, with those that are not among
// its M − N smallest replaced by kNotCandidateKey (equal keys: the lower index is the smaller).
// Branch-free, so that with a constant m the loops unroll and a loop over groups vectorises.
MGPP_HD void keep_candidate_keys(uint32_t* keys, int m, int prunable) {
  uint32_t k[16];
  for (int i = 0; i < m; ++i) k[i] = keys[i];
  for (int i = 0; i < m; ++i) {
    int rank = 0;
    for (int j = 0; j < m; ++j) rank += j < i ? k[j] <= k[i] : k[j] < k[i];
    keys[i] = rank < prunable ? k[i] : kNotCandidateKey;
  }
}

// The elements that a kernel takes as a whole under an N:M pattern of group size m: whole groups
// and whole bytes of a packed mask, lcm(8, m) (8 when unstructured, m = 0).
MGPP_HD int nm_unit(int m) {
  int unit = 8;
  while (m != 0 && unit % m != 0) unit += 8;
  return unit;
}

// Records the bin that one level of the selection chose, `before` keys lying in the bins below it
// and `inside` in it.
MGPP_HD void record_bin(int level, uint32_t bin, int64_t before, int64_t inside,
                        int64_t* selection) {
  selection[kSelRank] -= before;
  selection[kSelEqual] = inside;
  if (level == 0) {
    selection[kSelKey] = static_cast<int64_t>(bin) << kHistLowBits;
    selection[kSelBelow] = before;
  } else {
    selection[kSelKey] |= bin;
    selection[kSelBelow] += before;
  }
}

// One level of the radix selection (the SelectionSlot state of csrc/core/layout.h): level 0
// narrows to one high bin, level 1 to one low bin inside it. Keys of bfloat16 values have zero
// low bits, so when every candidate is bfloat16, τ is exact after level 0.
MGPP_HD void select_bin(const int64_t* histogram, int level, int64_t* selection) {
  const uint32_t bins = level == 0 ? kHistHighBins : kHistLowBins;
  const int64_t rank = selection[kSelRank];
  int64_t before = 0;
  uint32_t bin = 0;
  for (; bin + 1 < bins; ++bin) {
    if (before + histogram[bin] >= rank) break;
    before += histogram[bin];
  }
  record_bin(level, bin, before, histogram[bin], selection);
}

}  // namespace MGPP_NAMESPACE
