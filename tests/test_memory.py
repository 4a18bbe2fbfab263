"""docs/spec.md §3, memory: nothing step() or the optimizer's logging (stats(), which the
transformers callback calls at every log) runs allocates per candidate element, also for a
tensor of more than 2^31 elements. Measured as the growth of the peak during the call: of the
process's resident set (VmHWM, reset through /proc/self/clear_refs) for tensors on the CPU, of
torch's allocated memory for tensors on a CUDA device."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from mgpp_kernels import MGPP

# benchmarks/ is the repository's, not the package's: importable from the checkout's root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common.memory import peak_cuda_growth, peak_rss_growth  # noqa: E402

pytestmark = pytest.mark.slow

# At most this fraction of the candidates' bytes: a per-element temporary (a bool mask is one
# byte per element, an int64 count eight) is far above it.
PEAK_FRACTION = 0.05
RSS_UNMEASURABLE = peak_rss_growth(lambda: None) is None
NO_RSS = "needs /proc/self/clear_refs (Linux) to measure the peak resident set"


@pytest.mark.skipif(RSS_UNMEASURABLE, reason=NO_RSS)
def test_stats_counts_zeros_of_a_tensor_over_2_31_elements_without_a_temporary():
    numel = 2**31 + 4099
    candidate = torch.nn.Parameter(torch.full((numel,), 0.5, dtype=torch.bfloat16))
    candidate.data[:1000].zero_()
    candidate.data[-99:].zero_()
    optimizer = MGPP([{"params": [candidate], "prune": True}], backend="reference",
                     num_train_examples=10, initial_warmup_steps=1, total_steps=4)
    stats = {}
    growth = peak_rss_growth(lambda: stats.update(optimizer.stats()))
    assert stats["sparsity"] == 1099 / numel
    assert growth <= PEAK_FRACTION * candidate.numel() * candidate.element_size(), growth


def test_step_with_and_without_an_event_allocates_nothing_per_element(kernel_backend):
    if kernel_backend.slow:
        pytest.skip(f"backend {kernel_backend.name!r} runs through the Triton interpreter here: "
                    "its memory is the interpreter's, and these sizes would take it hours")
    if kernel_backend.device == "cpu" and RSS_UNMEASURABLE:
        pytest.skip(NO_RSS)
    peak_growth = peak_cuda_growth if kernel_backend.device == "cuda" else peak_rss_growth
    shapes = [(2**24 + 4099,), (3, 2**22), (7,)]
    candidates = [torch.nn.Parameter((torch.randn(s) * 0.02).to(kernel_backend.device))
                  for s in shapes]
    optimizer = MGPP([{"params": candidates, "prune": True}], backend=kernel_backend.name,
                     num_train_examples=10, initial_warmup_steps=1, total_steps=8,
                     final_warmup_steps=1, pruning_interval=2)
    for p in candidates:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()   # t = 0, dense: allocates m and v (state, not a temporary)
    candidate_bytes = sum(p.numel() * p.element_size() for p in candidates)
    for t in range(1, 8):   # events at t = 1 (t_i), 2, 4 and the freeze at t_end = 6
        growth = peak_growth(optimizer.step)
        # The freeze allocates the packed masks (1 bit per element): state, kept from now on.
        allowed = PEAK_FRACTION * candidate_bytes + (sum(p.numel() for p in candidates) / 8
                                                     if t == 6 else 0)
        assert growth <= allowed, (t, growth)
    growth = peak_growth(optimizer.stats)
    assert growth <= PEAK_FRACTION * candidate_bytes, growth
