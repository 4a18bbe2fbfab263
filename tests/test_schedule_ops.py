"""The torch.ops.mgpp ops on the device schedule (mgpp_kernels.ops, csrc/core/schedule.h):
schedule_step_ writes the step's row from the table and advances t unless found_inf is set, and
every step op reads that row: a skipped step moves nothing (the step counts included), the event
ops do nothing when k is 0, the threshold writes masks at the freeze only, and the prior's on/off
and c1 come from the row. Each against the same op on the host schedule, bit for bit, on the CPU
and (on a GPU) on CUDA; the CUDA kernels' reading of the row is also checked on the host by
csrc/tests/test_cuda_emulated.cpp."""
from __future__ import annotations

import math

import pytest
import torch

import backends
from compare import assert_bitwise_equal
from mgpp_kernels import ops
from mgpp_kernels.ops import layout

pytestmark = pytest.mark.skipif(not ops.BUILT, reason=f"mgpp_kernels._C: {ops.LOAD_ERROR}")

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=backends.BY_NAME["cuda"].marks())]
COLUMN = {name: j for j, name in enumerate(layout.CURRENT)}
TABLE = [[0.0, 0.0, 0.0, 0.0],          # t = 0: dense
         [1.0, -9.5, 40.0, 0.0],        # t = 1: an event
         [1.0, -11.0, 60.0, 1.0]]       # t = 2: the freeze; the row of every later t


def step_row(device, prior_on=1.0, c1=-9.5, k=0.0, freeze=0.0, skip=0.0):
    values = dict(prior_on=prior_on, c1=c1, k=k, freeze=freeze, skip=skip)
    return torch.tensor([values[name] for name in layout.CURRENT], dtype=torch.float64,
                        device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t, found_inf", [(0, None), (1, 0.0), (2, None), (9, 0.0), (1, 1.0),
                                          (2, math.nan)])
def test_schedule_step_writes_the_row_of_t_and_advances_unless_skipped(device, t, found_inf):
    table = torch.tensor(TABLE, dtype=torch.float64, device=device)
    position = torch.tensor(t, device=device)
    current = torch.full((len(layout.CURRENT),), -5.0, dtype=torch.float64, device=device)
    flag = None if found_inf is None else torch.tensor(found_inf, device=device)
    ops.schedule_step_(table, position, current, found_inf=flag)
    skip = found_inf is not None and found_inf != 0.0   # NaN counts as found
    expected = list(TABLE[min(t, len(TABLE) - 1)]) + [1.0 if skip else 0.0]
    if skip:
        expected[COLUMN["k"]] = 0.0
    assert current.cpu().tolist() == expected
    assert int(position) == (t if skip else t + 1)


def step_inputs(device, seed=0):
    """One fp32 and one bf16 parameter (4097: vector body and tail) with gradients and state."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(4097, generator=generator) * 1e-3,
              (torch.randn(33, 7, generator=generator) * 1e-3).bfloat16()]
    grads = [torch.randn(p.shape, generator=generator).to(p.dtype) * 1e-2 for p in params]
    exp_avgs = [torch.randn(p.shape, generator=generator) * 1e-3 for p in params]
    exp_avg_sqs = [torch.rand(p.shape, generator=generator) * 1e-5 for p in params]
    steps = [torch.tensor(3.0) for _ in params]
    to = lambda tensors: [t.to(device) for t in tensors]   # noqa: E731
    return [to(params), to(grads), to(exp_avgs), to(exp_avg_sqs),
            steps if device == "cpu" else to(steps)]


def scalars(device, prior_on=1.0, c1=0.0):
    values = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, prior_on=prior_on,
                  c1=c1, c2=1 / (2 * 1e-9) - 1 / (2 * 0.1), inv_n=1 / 67349, inv_sigma0_sq=1e9,
                  inv_sigma1_sq=10.0)
    return torch.tensor([values[name] for name in layout.STEP_SCALARS], dtype=torch.float64,
                        device=device)


def clone_all(inputs):
    return [[t.clone() for t in tensors] for tensors in inputs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row_prior_on, k", [(1.0, 0.0), (1.0, 40.0), (0.0, 40.0)])
def test_fused_step_takes_the_prior_from_the_row(device, row_prior_on, k):
    """The group's scalars say the prior is on with c1 = 0 (the device schedule's placeholder);
    the row's on/off and c1 give the update the host schedule's scalars give, bit for bit, and
    only a step that prunes (k != 0) counts the histogram."""
    inputs = step_inputs(device)
    expected = clone_all(inputs)
    histogram = torch.zeros(layout.HIGH_BINS, dtype=torch.int64, device=device)
    expected_histogram = histogram.clone()
    row = step_row(device, prior_on=row_prior_on, c1=-9.5, k=k)
    ops.fused_step_(*inputs, [], scalars(device), histogram=histogram, current=row)
    ops.fused_step_(*expected, [], scalars(device, prior_on=row_prior_on, c1=-9.5),
                    histogram=expected_histogram)
    for got, want in zip(inputs, expected):
        for a, b in zip(got, want):
            assert_bitwise_equal(a.cpu(), b.cpu())
    assert int(expected_histogram.sum()) == 4097 + 33 * 7
    assert_bitwise_equal(histogram.cpu(),
                         (expected_histogram if k else torch.zeros_like(histogram)).cpu())
    assert [float(s) for s in inputs[4]] == [4.0, 4.0]


@pytest.mark.parametrize("device", DEVICES)
def test_a_skipped_step_moves_nothing(device):
    inputs = step_inputs(device)
    before = clone_all(inputs)
    histogram = torch.zeros(layout.HIGH_BINS, dtype=torch.int64, device=device)
    masks = [torch.full(((p.numel() + 7) // 8,), 0x5A, dtype=torch.uint8, device=device)
             for p in inputs[0]]
    ops.fused_step_(*inputs, masks, scalars(device), histogram=histogram,
                    grad_scale=torch.tensor(2.0, device=device),
                    current=step_row(device, k=0.0, skip=1.0))
    for got, want in zip(inputs, before):
        for a, b in zip(got, want):
            assert_bitwise_equal(a.cpu(), b.cpu())
    assert int(histogram.count_nonzero()) == 0


def event_inputs(device):
    generator = torch.Generator().manual_seed(7)
    values = [torch.randn(4099, generator=generator), torch.randn(130, generator=generator).half()]
    values[0][::17] = 0.0
    return [v.to(device) for v in values]


def run_event(tensors, masks, device, current):
    """The level-0 and level-1 histograms and selections of k = 40, then the threshold."""
    selection = torch.tensor([40, 0, 0, 0], device=device)
    for level, bins in ((0, layout.HIGH_BINS), (1, layout.LOW_BINS)):
        histogram = torch.zeros(bins, dtype=torch.int64, device=device)
        ops.abs_histogram_(tensors, histogram, selection, level=level, current=current)
        if current is not None and current[COLUMN["k"]] == 0:
            assert int(histogram.count_nonzero()) == 0
        ops.radix_select_(histogram, selection, level=level, current=current)
    ops.apply_threshold_(tensors, masks, selection, current=current)
    return selection


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k, freeze", [(0.0, 0.0), (40.0, 0.0), (40.0, 1.0)])
def test_event_ops_follow_the_row(device, k, freeze):
    """k = 0: the event ops change nothing. An event prunes as on the host schedule; it writes
    the masks at the freeze only (before it, every candidate keeps its all-ones mask)."""
    tensors, expected = event_inputs(device), event_inputs(device)
    original = event_inputs(device)
    ones = lambda: [torch.full(((t.numel() + 7) // 8,), 0xFF, dtype=torch.uint8,  # noqa: E731
                               device=device) for t in tensors]
    masks, expected_masks = ones(), ones()
    selection = run_event(tensors, masks, device, step_row(device, k=k, freeze=freeze))
    expected_selection = run_event(expected, expected_masks if freeze else [], device, None)
    if k == 0:
        assert selection.cpu().tolist() == [40, 0, 0, 0]
        expected, expected_masks = original, ones()
    else:
        assert_bitwise_equal(selection.cpu(), expected_selection.cpu())
    for got, want in zip(tensors + masks, expected + expected_masks):
        assert_bitwise_equal(got.cpu(), want.cpu())
    if k and freeze:
        assert any(int((m != 0xFF).sum()) for m in masks)


@pytest.mark.parametrize("device", DEVICES)
def test_a_bad_row_is_refused_before_anything_changes(device):
    inputs = step_inputs(device)
    before = clone_all(inputs)
    for bad in (torch.zeros(4, dtype=torch.float64, device=device),
                torch.zeros(len(layout.CURRENT), dtype=torch.float32, device=device)):
        with pytest.raises(ValueError, match="current must be"):
            ops.fused_step_(*inputs, [], scalars(device), current=bad)
    for got, want in zip(inputs, before):
        for a, b in zip(got, want):
            assert_bitwise_equal(a.cpu(), b.cpu())
    position = torch.tensor(1, device=device)
    current = step_row(device)
    with pytest.raises(ValueError, match="table must be"):
        ops.schedule_step_(torch.zeros(3, 5, dtype=torch.float64, device=device), position,
                           current)
    with pytest.raises(ValueError, match="position must be"):
        ops.schedule_step_(torch.tensor(TABLE, dtype=torch.float64, device=device),
                           torch.tensor(1.0, device=device), current)
    assert int(position) == 1
