"""The CUDA backend: the extension is built with its CUDA kernels and registers one for every
torch.ops.mgpp op; on a machine with a GPU, the kernels match the CPU kernel bit for bit and the
reference within docs/spec.md §4, and step() never waits for the GPU."""
from __future__ import annotations

import os
import re

import pytest
import torch

import mgpp_kernels._C  # noqa: F401  (registers torch.ops.mgpp)
from mgpp_kernels import MGPP, ops as mgpp_ops, reference
from mgpp_kernels.masks import pack_mask
from mgpp_kernels.backends import BackendUnavailableError, load_backend
from mgpp_kernels.backends.types import Prior, PruneEvent, UpdateGroup
from mgpp_kernels.backends.scalars import step_scalars

CUDA_EXPECTED = torch.version.cuda is not None and os.environ.get("MGPP_SKIP_CUDA") != "1"


def requires_gpu(test):
    """Marked gpu (the GPU run selects `-m gpu`), and skipped without a CUDA device."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="no CUDA device: the CUDA kernels are only compiled here")
    return pytest.mark.gpu(skip(test))


def tensor_ops() -> list[str]:
    """Every torch.ops.mgpp op that takes a tensor (those need a kernel per device)."""
    names = []
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("mgpp::"):
            continue
        schema = getattr(torch.ops.mgpp, name.split("::")[1]).default._schema
        if any("Tensor" in str(argument.type) for argument in schema.arguments):
            names.append(name)
    return sorted(names)


# ---- the build (runs everywhere) ---------------------------------------------------------------

@pytest.mark.skipif(not CUDA_EXPECTED, reason="torch without CUDA, or MGPP_SKIP_CUDA=1")
def test_every_op_has_a_cuda_kernel():
    ops = tensor_ops()
    assert {"mgpp::fused_step_", "mgpp::abs_histogram_", "mgpp::radix_select_",
            "mgpp::apply_threshold_"} <= set(ops)
    cpu_only = {f"mgpp::{name}" for name in mgpp_ops.CPU_ONLY_OPS}
    missing = [op for op in ops if op not in cpu_only
               and not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert not missing, (f"no CUDA kernel for {missing}: the extension was built without CUDA "
                         f"(set CUDA_HOME and rebuild; setup.py prints why it skipped CUDA)")


def test_every_op_keeps_its_cpu_kernel():
    missing = [op for op in tensor_ops()
               if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")]
    assert not missing


def test_layout_exports_the_header_constants():
    """csrc/core/layout.h and formats.h's dtype codes as mgpp_kernels/ops/layout.py checks them
    at import."""
    assert torch.ops.mgpp.layout() == (
        "step_scalars=lr,beta1,beta2,eps,weight_decay,prior_on,c1,c2,inv_n,inv_sigma0_sq,"
        "inv_sigma1_sq;high_bins=65536;low_bins=32768;selection=rank,key,below,equal;"
        "schedule=prior_on,c1,k,freeze;dtypes=float32,bfloat16,float16")


def test_build_info_names_the_cpu_target():
    info = torch.ops.mgpp.build_info()
    assert re.match(r"cpu kernels: path \S+ \([\w ]+; built: [^)]+\)(, [^)]+\))*\), "
                    r"-march=\S+ \([\w -]+; conversions bf16->f32 [\w -]+, "
                    r"f32->bf16 in-loop recipe, f16<->f32 [\w /-]+; compress/expand [\w /-]+\), "
                    r"OpenMP \d+, compiler ", info), info


@pytest.mark.skipif(not CUDA_EXPECTED, reason="torch without CUDA, or MGPP_SKIP_CUDA=1")
def test_build_info_reports_the_cuda_build():
    info = torch.ops.mgpp.build_info()
    match = re.search(r"; cuda kernels: CUDA \d+\.\d+, nvcc (\d+)\.(\d+)\.\d+((?:, sm_\d+)+)$",
                      info)
    assert match, info
    # The 32 KB kernel argument tables need nvcc 12.1 and sm_70 or newer.
    assert (int(match.group(1)), int(match.group(2))) >= (12, 1)
    archs = [int(a) for a in re.findall(r"sm_(\d+)", match.group(3))]
    assert archs and min(archs) >= 70, info


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_cuda_backend_without_a_device_is_an_error():
    with pytest.raises(BackendUnavailableError, match="cuda"):
        load_backend("cuda")
    with pytest.raises(BackendUnavailableError):
        MGPP([torch.nn.Parameter(torch.ones(3))], num_train_examples=10, initial_warmup_steps=1,
             total_steps=10, backend="cuda")


# ---- the kernels on a GPU ------------------------------------------------------------------------

DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
               (torch.float16, torch.float16)]
# Sizes that break kernels: one element, a tail, 128-bit vectors plus a tail, two blocks plus one
# element (a block is 32768 elements), empty.
SIZES = [1, 7, 4097, 65537, 0, 33]


def values(n: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=generator) * scale
    x[::17] = 0.0
    x[5::17] = -0.0125     # ties
    x[11::17] = 1e-39      # a float32 denormal
    x[13::17] = 3.0        # the prior's exp overflows
    return x


def misaligned(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x's values in a view that starts `offset` elements into a larger buffer."""
    buffer = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device)
    view = buffer[offset:]
    view.copy_(x)
    return view


def step_case(param_dtype, state_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for i, n in enumerate(SIZES):
        offset = 1 if i % 3 == 1 else 0
        param = misaligned(values(n, 0.05, g).to(param_dtype).to(device), offset)
        grad = (torch.randn(n, generator=g) * 0.01).to(param_dtype).to(device)
        exp_avg = (torch.randn(n, generator=g) * 1e-3).to(state_dtype).to(device)
        exp_avg_sq = (torch.rand(n, generator=g) * 1e-5).to(state_dtype).to(device)
        mask = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, generator=g).to(device)
        tensors.append([param, grad, exp_avg, exp_avg_sq, mask])
    return tensors


def update_group(tensors, steps, masked, prior_on) -> UpdateGroup:
    return UpdateGroup(
        params=[t[0] for t in tensors], grads=[t[1] for t in tensors],
        exp_avgs=[t[2] for t in tensors], exp_avg_sqs=[t[3] for t in tensors],
        state_steps=steps, keep_masks=[t[4] for t in tensors] if masked else [],
        lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
        prior=Prior(0.05, 1e-10, 0.05, 1000) if prior_on else None, event=0)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32).cpu()


@requires_gpu
@pytest.mark.parametrize("param_dtype,state_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("masked,prior_on,scaled", [(False, True, False), (True, False, True)])
def test_fused_step_matches_the_cpu_kernel_bit_for_bit(param_dtype, state_dtype, masked, prior_on,
                                                       scaled):
    cuda_tensors = step_case(param_dtype, state_dtype, "cuda")
    cpu_tensors = [[t.cpu().contiguous() for t in ts] for ts in cuda_tensors]
    cuda_steps = [torch.tensor(float(i), device="cuda") for i in range(len(SIZES))]
    cpu_steps = [torch.tensor(float(i)) for i in range(len(SIZES))]
    cuda_group = update_group(cuda_tensors, cuda_steps, masked, prior_on)
    cpu_group = update_group(cpu_tensors, cpu_steps, masked, prior_on)
    scale = torch.tensor(256.0) if scaled else None
    histogram = torch.zeros(1 << 16, dtype=torch.int64, device="cuda")
    cpu_histogram = torch.zeros(1 << 16, dtype=torch.int64)
    cuda_scalars = step_scalars([cuda_group], torch.device("cuda"))
    cpu_scalars = step_scalars([cpu_group], torch.device("cpu"))
    for _ in range(2):
        torch.ops.mgpp.fused_step_(
            cuda_group.params, cuda_group.grads, cuda_group.exp_avgs, cuda_group.exp_avg_sqs,
            cuda_group.state_steps, cuda_group.keep_masks, cuda_scalars,
            None if scale is None else scale.cuda(), histogram)
        torch.ops.mgpp.fused_step_(
            cpu_group.params, cpu_group.grads, cpu_group.exp_avgs, cpu_group.exp_avg_sqs,
            cpu_group.state_steps, cpu_group.keep_masks, cpu_scalars, scale, cpu_histogram)
    for i, (on_gpu, on_cpu) in enumerate(zip(cuda_tensors, cpu_tensors)):
        for index, name in ((0, "param"), (2, "exp_avg"), (3, "exp_avg_sq")):
            assert torch.equal(bits(on_gpu[index]), bits(on_cpu[index])), (
                f"{name} of tensor {i} (size {SIZES[i]}) differs")
    assert [float(s) for s in cuda_steps] == [float(s) for s in cpu_steps] == [i + 2.0 for i in range(len(SIZES))]
    assert torch.equal(histogram.cpu(), cpu_histogram)


def candidates(device, dtypes=(torch.float32,)):
    g = torch.Generator().manual_seed(3)
    tensors = []
    for i, n in enumerate([1, 0, 4097, 70001, 7, 33]):
        dtype = dtypes[i % len(dtypes)]
        tensors.append(misaligned(values(n, 0.02, g).to(dtype).to(device), i % 2))
    return tensors


@requires_gpu
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float16,),
                                    (torch.float32, torch.bfloat16, torch.float16)])
def test_threshold_is_kthvalue_exactly(dtypes):
    backend = load_backend("cuda")
    tensors = candidates("cuda", dtypes)
    n = sum(t.numel() for t in tensors)
    for k in [1, 2, n // 3, n // 2, n - 1, n]:
        tau = backend.global_threshold(tensors, k)
        expected = reference.global_threshold([t.cpu() for t in tensors], k)
        assert tau.view(torch.int32).item() == expected.view(torch.int32).item(), f"k = {k}"


@requires_gpu
@pytest.mark.parametrize("fill", [0.0, 0.5, 1e-40])
def test_threshold_when_all_values_are_equal(fill):
    backend = load_backend("cuda")
    tensors = [torch.full((n,), fill, device="cuda") for n in (5, 1, 300)]
    for k in (1, 150, 306):
        tau = backend.global_threshold(tensors, k)
        assert tau.item() == torch.tensor(fill, dtype=torch.float32).item()


@requires_gpu
def test_apply_threshold_matches_the_reference_with_masks():
    tensors = candidates("cuda", (torch.float32, torch.bfloat16, torch.float16))
    expected = [t.cpu().clone() for t in tensors]
    n = sum(t.numel() for t in tensors)
    k = n // 2
    tau = reference.global_threshold(expected, k)
    masks = [torch.full(((t.numel() + 7) // 8,), 0xAB, dtype=torch.uint8, device="cuda") for t in tensors]
    event = PruneEvent(params=tensors, k=k, keep_masks=masks)
    threshold, = load_backend("cuda").step([], [event], None)
    below = 0
    for t, e, mask in zip(tensors, expected, masks):
        keep = reference.keep_mask(e, tau)
        below += int((~keep).sum())
        e.masked_fill_(~keep, 0)
        assert torch.equal(bits(t), bits(e))
        assert torch.equal(mask.cpu(), pack_mask(keep))
    assert threshold.tau.item() == tau.item() and int(threshold.pruned) == below


def model_params(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (48, 33), (7,), (1, 1), (129,)]
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(device)) for s in shapes]


def run(backend, device, steps, **overrides):
    params = model_params(device)
    kwargs = dict(lr=1e-3, weight_decay=0.01, num_train_examples=500, initial_warmup_steps=5,
                  total_steps=steps, final_warmup_steps=5, pruning_interval=4,
                  initial_sparsity=0.2, final_sparsity=0.7, backend=backend)
    kwargs.update(overrides)
    optimizer = MGPP([{"params": params[:2] + params[3:4], "prune": True},
                      {"params": params[2:3] + params[4:], "prune": False}], **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 0.01).to(device)
        optimizer.step()
    return params, optimizer


@requires_gpu
def test_every_stage_matches_the_reference():
    steps = 60
    got, optimizer = run("cuda", "cuda", steps)
    want, _ = run("reference", "cpu", steps)
    assert optimizer.backend == "cuda"
    for g, w in zip(got, want):
        g = g.detach().cpu()
        assert torch.linalg.norm(g - w) <= 1e-4 * torch.linalg.norm(w)
    candidates_got = torch.cat([p.detach().cpu().flatten() for p in got[:2] + got[3:4]])
    candidates_want = torch.cat([p.detach().flatten() for p in want[:2] + want[3:4]])
    assert ((candidates_got == 0) != (candidates_want == 0)).float().mean() <= 1e-3


@requires_gpu
def test_prior_off_and_no_pruning_is_adamw():
    params = model_params("cuda")
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = MGPP(params, lr=1e-3, weight_decay=0.01, num_train_examples=10,
                     initial_warmup_steps=10, total_steps=200, backend="cuda")
    adamw = torch.optim.AdamW(torch_params, lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(2)
    for _ in range(100):
        for p, q in zip(params, torch_params):
            p.grad = (torch.randn(p.shape, generator=g) * 0.01).cuda()
            q.grad = p.grad.clone()
        optimizer.step()
        adamw.step()
    for p, q in zip(params, torch_params):
        assert (p - q).abs().max().item() <= 1e-6


@requires_gpu
def test_step_never_waits_for_the_gpu():
    params = model_params("cuda")
    optimizer = MGPP([{"params": params, "prune": True}], lr=1e-3, num_train_examples=500,
                     initial_warmup_steps=1, total_steps=6, pruning_interval=2, backend="cuda")
    grads = [torch.randn_like(p) * 0.01 for p in params]
    optimizer.step()  # allocates state and pinned buffers
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):   # t = 1..6: events, steps between them, the freeze, a frozen step
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@requires_gpu
def test_auto_picks_cuda_and_cpu_tensors_are_an_error():
    optimizer = MGPP(model_params("cuda"), num_train_examples=10, initial_warmup_steps=1,
                     total_steps=10)
    assert optimizer.backend == "cuda"
    with pytest.raises(ValueError, match="CUDA tensors"):
        MGPP(model_params("cpu"), num_train_examples=10, initial_warmup_steps=1, total_steps=10,
             backend="cuda")


@requires_gpu
def test_ops_reject_tensors_on_another_device():
    tensors = step_case(torch.float32, torch.float32, "cuda")
    group = update_group(tensors, [torch.tensor(0.0, device="cuda") for _ in tensors], False, False)
    before = tensors[0][0].clone()
    scalars = step_scalars([group], torch.device("cuda"))
    with pytest.raises(ValueError, match="is on cpu"):
        torch.ops.mgpp.fused_step_(group.params, [g.cpu() for g in group.grads], group.exp_avgs,
                                   group.exp_avg_sqs, group.state_steps, [], scalars, None, None)
    # The step counts live on the device, where the kernels read them.
    host_steps = [s.cpu() for s in group.state_steps]
    with pytest.raises(ValueError, match=r"state_steps\[0\] must be a float32 tensor on cuda"):
        torch.ops.mgpp.fused_step_(group.params, group.grads, group.exp_avgs, group.exp_avg_sqs,
                                   host_steps, [], scalars, None, None)
    assert torch.equal(tensors[0][0], before)
    assert all(float(s) == 0.0 for s in group.state_steps + host_steps)
