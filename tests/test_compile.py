"""torch.compile: the torch.ops.mgpp ops have fake (meta) implementations
(mgpp_kernels/ops), pass torch.library.opcheck, trace into a graph, and a training loop whose
model is compiled runs with MGPP (backend "cpu") as the eager loop does. A compiled
optimizer.step() runs eagerly (torch.compiler.disable) and equals the eager step bit for bit, on
every backend of tests/backends.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from mgpp_kernels import MGPP
from mgpp_kernels.ops.layout import HIGH_BINS, LOW_BITS, NUM_SELECTION_SLOTS, NUM_STEP_SCALARS

from compare import assert_bitwise_equal

import backends

# The ops are the cpu backend's: they need the compiled extension.
needs_ops = pytest.mark.skipif(backends.BY_NAME["cpu"].unavailable is not None,
                               reason="the cpu backend (mgpp_kernels._C) is not built")
# lr, beta1, beta2, eps, weight_decay, prior_on, c1, c2, inv_n, inv_sigma0_sq, inv_sigma1_sq
SCALARS = [1e-2, 0.9, 0.999, 1e-8, 0.01, 1.0, -5.0, 1e3, 1e-2, 1e4, 20.0]
assert len(SCALARS) == NUM_STEP_SCALARS


def step_inputs(seed: int = 0):
    """fused_step_'s arguments over a float32 and a bfloat16 tensor, with a histogram."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(37, generator=generator) * 0.1,
              (torch.randn(5, 3, generator=generator) * 0.1).to(torch.bfloat16)]
    grads = [torch.randn(p.shape, generator=generator).to(p.dtype) * 0.01 for p in params]
    return (params, grads, [torch.zeros(p.shape) for p in params],
            [torch.zeros(p.shape) for p in params], [torch.zeros(()) for _ in params], [],
            torch.tensor(SCALARS, dtype=torch.float64), None,
            torch.zeros(HIGH_BINS, dtype=torch.int64))


@needs_ops
def test_fake_implementations_check_what_they_can():
    with FakeTensorMode():
        params, grads, *rest = step_inputs()
        torch.ops.mgpp.fused_step_(params, grads, *rest)   # valid: no error, nothing computed
        with pytest.raises(ValueError, match="must match params"):
            torch.ops.mgpp.fused_step_(params, [torch.zeros(36), grads[1]], *rest)
        with pytest.raises(ValueError, match="lists of equal length"):
            torch.ops.mgpp.fused_step_(params, grads[:1], *rest)
        with pytest.raises(ValueError, match="histogram"):
            torch.ops.mgpp.abs_histogram_(params, torch.zeros(10, dtype=torch.int64),
                                          torch.zeros(NUM_SELECTION_SLOTS, dtype=torch.int64), 0)
        with pytest.raises(ValueError, match="level"):
            torch.ops.mgpp.radix_select_(torch.zeros(HIGH_BINS, dtype=torch.int64),
                                         torch.zeros(NUM_SELECTION_SLOTS, dtype=torch.int64), 2)
        with pytest.raises(ValueError, match="one per tensor"):
            torch.ops.mgpp.apply_threshold_(params, [torch.zeros(5, dtype=torch.uint8)],
                                            torch.zeros(NUM_SELECTION_SLOTS, dtype=torch.int64))
        with pytest.raises(ValueError, match="window must be"):
            torch.ops.mgpp.fused_step_(params, grads, *rest, None, [], [5, 5])
        with pytest.raises(ValueError, match="window must be"):
            torch.ops.mgpp.fused_step_(params, grads, *rest[:-1], None, None, [], [0, 5])
        with pytest.raises(ValueError, match="current must be a float64 tensor of 5"):
            torch.ops.mgpp.fused_step_(params, grads, *rest, torch.zeros(4, dtype=torch.float64))
        with pytest.raises(ValueError, match="current must be"):
            torch.ops.mgpp.apply_threshold_(params, [], torch.zeros(NUM_SELECTION_SLOTS, dtype=torch.int64),
                                            torch.zeros(5, dtype=torch.float32))
        with pytest.raises(ValueError, match="table must be"):
            torch.ops.mgpp.schedule_step_(torch.zeros(3, 5, dtype=torch.float64),
                                          torch.zeros((), dtype=torch.int64),
                                          torch.zeros(5, dtype=torch.float64), None)


@needs_ops
def test_opcheck():
    selection = torch.tensor([20, 0, 0, 0])
    histogram = torch.zeros(HIGH_BINS, dtype=torch.int64)
    params = step_inputs()[0]
    torch.ops.mgpp.abs_histogram_(params, histogram, selection, 0)
    chosen = selection.clone()   # τ's high bin chosen, for the one-pass event's ops
    torch.ops.mgpp.radix_select_(histogram.clone(), chosen, 0)
    in_bin = int(histogram[int(chosen[1]) >> LOW_BITS])

    def masks():
        return [torch.zeros((p.numel() + 7) // 8, dtype=torch.uint8) for p in params]

    table = torch.tensor([[1.0, -9.0, 0.0, 0.0], [1.0, -9.5, 20.0, 1.0]], dtype=torch.float64)
    current = torch.tensor([1.0, -9.5, 20.0, 1.0, 0.0], dtype=torch.float64)
    cases = {
        "fused_step_": step_inputs(),
        "fused_step_ on the device schedule": (*step_inputs(), current),
        "fused_step_ in a window": (*step_inputs(), None, [], [1000, 16000]),
        "schedule_step_": (table, torch.tensor(1), torch.zeros(5, dtype=torch.float64),
                           torch.tensor(0.0)),
        "abs_histogram_": (params, torch.zeros(HIGH_BINS, dtype=torch.int64), selection, 0),
        "radix_select_": (histogram, selection.clone(), 0),
        "apply_threshold_": ([p.clone() for p in params],
                             [torch.zeros((p.numel() + 7) // 8, dtype=torch.uint8)
                              for p in params],
                             torch.tensor([20, 0x3C000000, 0, 0])),
        "partition_at_bin_": ([p.clone() for p in params], masks(), chosen,
                              torch.zeros(1 << LOW_BITS, dtype=torch.int64),
                              torch.empty(in_bin, dtype=torch.int32)),
        "prune_collected_": ([p.clone() for p in params], masks(), torch.tensor([3, 40]).int(),
                             torch.tensor([20, 0x3C000000, 0, 0])),
    }
    for case, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.mgpp, case.split()[0]).default, args)


@needs_ops
def test_ops_trace_into_one_graph():
    """fullgraph=True: a fused step and a first-level selection compile without a graph break
    (the fake implementations give Dynamo and AOTAutograd the ops' metadata) and compute what
    the eager ops compute."""
    def step_and_select(params, grads, exp_avgs, exp_avg_sqs, steps, masks, scalars, grad_scale,
                        histogram):
        torch.ops.mgpp.fused_step_(params, grads, exp_avgs, exp_avg_sqs, steps, masks, scalars,
                                   grad_scale, histogram)
        selection = torch.tensor([20, 0, 0, 0])
        torch.ops.mgpp.radix_select_(histogram, selection, 0)
        return selection

    compiled = torch.compile(step_and_select, fullgraph=True, backend="aot_eager")
    eager_args, compiled_args = step_inputs(), step_inputs()
    assert torch.equal(compiled(*compiled_args), step_and_select(*eager_args))
    for eager, traced in zip(eager_args[:5], compiled_args[:5]):
        for a, b in zip(eager, traced):
            assert_bitwise_equal(b, a)


def build(backend=backends.BY_NAME["cpu"]):
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model = model.to(backend.device)
    optimizer = MGPP([{"params": [model[0].weight, model[2].weight], "prune": True},
                      {"params": [model[0].bias, model[2].bias], "prune": False}],
                     lr=1e-2, backend=backend.name, num_train_examples=100, initial_warmup_steps=2,
                     total_steps=12, final_warmup_steps=2, pruning_interval=3,
                     final_sparsity=0.8)
    return model, optimizer


def train(model, optimizer, forward, step) -> None:
    device = next(model.parameters()).device
    for t in range(12):
        generator = torch.Generator().manual_seed(t)
        x = torch.randn(8, 16, generator=generator).to(device)
        y = torch.randint(0, 4, (8,), generator=generator).to(device)
        optimizer.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        step()


@needs_ops
def test_training_loop_with_compiled_model():
    """Inductor compiles the model (its kernels may round differently from eager, so the runs
    are compared in norm); MGPP prunes it through every stage to the final sparsity."""
    model, optimizer = build()
    train(model, optimizer, torch.compile(model), optimizer.step)
    eager, eager_optimizer = build()
    train(eager, eager_optimizer, eager, eager_optimizer.step)
    stats = optimizer.stats()
    assert stats["stage"] == "frozen" and stats["step"] == 12
    assert stats["sparsity"] == pytest.approx(0.8, abs=0.01)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-4), name
        assert torch.equal(p == 0, q == 0) if name.endswith("weight") else True


def test_compiled_optimizer_step_equals_eager(any_backend):
    backend = any_backend
    model, optimizer = build(backend)
    train(model, optimizer, model, torch.compile(optimizer.step, backend="aot_eager"))
    eager, eager_optimizer = build(backend)
    train(eager, eager_optimizer, eager, eager_optimizer.step)
    assert optimizer.state_dict()["mgpp"]["schedule_step"] == 12
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_bitwise_equal(p, q, name)
