"""The checks and the benchmark of benchmarks/gpu/run.sh: MGPP `cuda` and `triton` on one GPU, the
GPU-only checks first, then MGPP against torch.optim.AdamW(fused=True) (and capturable=True), all
in one process, so that every ratio is measured side by side.

    python benchmarks/gpu/bench_gpu.py OUT_DIR [--part smoke|bench] [--backends cuda,triton]
                                       [--dry-run]

--part smoke: one tiny step of each backend against the reference (run.sh's smoke stage).
--part bench (the default), section by section:
  agreement     each backend against the cpu backend from the same inputs, step by step through
                every stage (events, the freeze) and in 16-bit storage, as a fraction of the bound
                of docs/spec.md §4 across backends (benchmarks/common/agreement.py, which
                tests/test_rounding.py asserts);
  threshold     τ of each backend's radix selection bit for bit against torch.kthvalue;
  host_syncs    synchronising calls in GradScaler.step(optimizer), counted by
                torch.cuda.set_sync_debug_mode("warn"), the schedule on the host and on the device;
  graph_replay  ten steps (three events, then the freeze) and a skipped one replayed from a CUDA
                graph of MGPP with capturable=True, against the same steps run eagerly: bits and
                the time per step;
  steps_*       a step without and with a pruning event on the BERT-base candidates and on 1B
                elements, in fp32, bf16 (MGPP with bf16 state beside fused AdamW's, the same bytes)
                and bf16 with fp32 state: CUDA events around back-to-back steps after warm-up
                (host time per step apart), the optimizers and a device copy taking turns, GB/s
                from the bytes of each row's own parameter, gradient and state dtypes, against the
                copy's;
  selection     τ selection by each backend against kthvalue and topk on the same weights.

--backends: the kernel backends under test (default cuda,triton; cpu,triton in the dry run);
those that are not built run no rows and are named under "unavailable", the others run theirs.

Results: OUT_DIR/gpu_bench.json and OUT_DIR/gpu_bench.md, rewritten after every section (the smoke
part's section kept beside the bench part's). A section or a row that raises records its error
("error") and the next one runs. The last lines printed, "summary: ...", are the key numbers of
run.sh's summary. Exit status 1 when a section or a row failed or a check is out of bounds.

--dry-run: the same sections on the CPU, tiny sizes, the triton backend through the interpreter
and the cpu backend in the place of cuda (a GPU's graphs, events and sync checks do not exist
there: the replays are eager calls, the times the wall clock, the syncs not counted), so that the
test suite runs every line of it. MGPP_GPU_RUN_FAIL (run.sh's stages, comma-separated, or "all";
tests/test_gpu_script.py sets it): with "build" in it, cuda (cpu in the dry run) counts as not
built; with "smoke" or "bench", that part's first section raises.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch

# The checkout's mgpp_kernels and benchmarks.common.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mgpp_kernels  # noqa: E402
from mgpp_kernels import MGPP, reference, schedule, verify  # noqa: E402
from mgpp_kernels.backends import BackendUnavailableError, load_backend  # noqa: E402
from mgpp_kernels.workloads import BERT_BASE, BertShapes, random_parameters  # noqa: E402

from benchmarks.common import agreement  # noqa: E402
from benchmarks.common.machine import triton_version  # noqa: E402
from benchmarks.common.settings import LR, NUM_TRAIN_EXAMPLES  # noqa: E402
from benchmarks.common.storage import BY_LABEL, Storage  # noqa: E402
from benchmarks.common.timing import back_to_back_seconds, copy_call  # noqa: E402

CPU = torch.device("cpu")
Shape = tuple[int, ...]
LARGE_ELEMENTS = 1 << 30   # about a 7B LLaMA's decoder layers held by one rank
STEP_STORAGES = (BY_LABEL["fp32"], BY_LABEL["bf16"], BY_LABEL["bf16, fp32 state"])


class Timing(NamedTuple):
    """Untimed warm-up steps, then rounds in which every row takes a turn of `calls` steps."""
    warmup: int
    rounds: int
    calls: int


@dataclass(frozen=True)
class Sizes:
    """What the sections run on."""
    bert: BertShapes              # the speed rows', τ's and selection's BERT-base candidates
    large: list[Shape]            # the speed rows' 1B elements
    layer: list[Shape]            # one layer's candidates: host syncs, graph replay
    agreement: list[Shape]
    smoke: list[Shape]
    copy_elements: int
    bert_timing: Timing
    large_timing: Timing
    selection_calls: int


GPU_SIZES = Sizes(
    bert=BERT_BASE,
    # 64 tensors of 4096-wide rows, the shape of a model's layer weights.
    large=[(LARGE_ELEMENTS // (64 * 4096), 4096)] * 64,
    layer=BERT_BASE.layer_candidate_shapes(),
    # tests/test_rounding.py's shapes, and one of several blocks with a tail.
    agreement=[(1,), (7,), (4097,), (513, 1031)],
    smoke=[(1,), (7,), (4097,), (33, 65)],
    copy_elements=1 << 28,        # 1 GiB per array, far beyond L2
    bert_timing=Timing(warmup=3, rounds=5, calls=20),
    large_timing=Timing(warmup=2, rounds=3, calls=5),
    selection_calls=5)
# The dry run's: the Triton interpreter runs every program instance in Python.
DRY_RUN_BERT = BertShapes(layers=1, hidden=32)
DRY_RUN_SIZES = Sizes(
    bert=DRY_RUN_BERT, large=[(1 << 12,)] * 4, layer=DRY_RUN_BERT.layer_candidate_shapes(),
    agreement=[(1,), (7,), (4097,)], smoke=[(1,), (7,), (33, 65)], copy_elements=1 << 16,
    bert_timing=Timing(warmup=1, rounds=2, calls=2),
    large_timing=Timing(warmup=1, rounds=2, calls=2), selection_calls=2)

# The speed rows' schedule: t = 0 prunes to s_i; an interval of 1 then prunes at every step, one
# of 10^5 never again (T = 20,000 is never reached).
STEP_SCHEDULE = dict(num_train_examples=NUM_TRAIN_EXAMPLES, initial_warmup_steps=0,
                     total_steps=20_000, final_warmup_steps=0, initial_sparsity=0.5,
                     final_sparsity=0.9)
EVENT_INTERVAL, NO_EVENT_INTERVAL = 1, 10**5


@dataclass
class Run:
    device: torch.device
    dry_run: bool
    sizes: Sizes
    backends: list[str]           # the kernel backends under test that are built
    unavailable: dict[str, str]   # the others, with the reason


# ---- rows and their errors -----------------------------------------------------------------------

def describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def failure(error: BaseException) -> dict:
    """The "error" field of a row or section that raised `error`; its traceback goes to the log."""
    traceback.print_exc()
    return {"error": describe(error)}


def attempt(identity: dict, measure: Callable[[], dict]) -> dict:
    """`identity` with what `measure` returns, or with the error it raised: one row's failure (a
    compile error, an out-of-memory) is recorded and the next row runs."""
    try:
        return identity | measure()
    except Exception as error:  # noqa: BLE001 - recorded in the row
        return identity | failure(error)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN equals NaN, -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.detach().cpu().view(view), b.detach().cpu().view(view))
    return torch.equal(a.cpu(), b.cpu())


def make_params(shapes, dtype, device, seed, grad_std=1e-3) -> list[torch.nn.Parameter]:
    """Parameters ~ normal(0, 0.04) with gradients ~ normal(0, grad_std²), drawn on the device (a
    billion draws on the host would take longer than the measurements)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return random_parameters(shapes, generator, std=0.04, grad_std=grad_std, dtype=dtype)


# ---- smoke: one tiny step of each backend against the reference ----------------------------------

SMOKE_SCHEDULE = dict(num_train_examples=NUM_TRAIN_EXAMPLES, initial_warmup_steps=0,
                      total_steps=10, initial_sparsity=0.5, final_sparsity=0.9)


def smoke_rows(run: Run) -> list[dict]:
    return [attempt({"backend": backend}, lambda backend=backend: smoke_step(run, backend))
            for backend in run.backends]


def smoke_step(run: Run, backend: str) -> dict:
    """The first step (an event: t_i = 0 prunes to s_i) of the backend on the device and of the
    reference on the CPU from the same θ and g: θ, m and v as fractions of docs/spec.md §4's
    one-step bound (verify's), and the positions pruned by one and not the other."""
    generator = torch.Generator().manual_seed(11)
    weights = [torch.randn(shape, generator=generator) * 0.04 for shape in run.sizes.smoke]
    grads = [torch.randn(shape, generator=generator) * 1e-3 for shape in run.sizes.smoke]
    runs = {}
    for name, device in (("reference", CPU), (backend, run.device)):
        params = [torch.nn.Parameter(w.to(device, copy=True)) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        optimizer = MGPP([{"params": params, "prune": True}], lr=1e-3, weight_decay=0.0,
                         backend=name, **SMOKE_SCHEDULE)
        optimizer.step()
        runs[name] = params, optimizer
    (ref_params, ref), (params, optimizer) = runs["reference"], runs[backend]
    beta1, beta2 = ref.defaults["betas"]
    config = ref.config
    lambda_t = schedule.schedule_at(config, 0).lambda_t
    worst = {"theta": 0.0, "m": 0.0, "v": 0.0}
    mismatches = 0
    for w, g, p, r in zip(weights, grads, params, ref_params):
        total = g + reference.prior_gradient(w, lambda_t, config.sigma0_sq, config.sigma1_sq,
                                             config.num_train_examples)
        state, ref_state = optimizer.state[p], ref.state[r]
        error = verify.one_step_error(
            (p.detach().cpu(), state["exp_avg"].cpu(), state["exp_avg_sq"].cpu()),
            (r.detach(), ref_state["exp_avg"], ref_state["exp_avg_sq"]),
            torch.zeros_like(w), torch.zeros_like(w), total, beta1, beta2)
        worst = {key: max(worst[key], error[key]) for key in worst}
        mismatches += int(((p.detach().cpu() == 0) != (r.detach() == 0)).sum())
    elements = sum(w.numel() for w in weights)
    stats, ref_stats = optimizer.stats(), ref.stats()
    return dict(elements=elements, theta_of_bound=worst["theta"], m_of_bound=worst["m"],
                v_of_bound=worst["v"], pruned=stats["pruned"], reference_pruned=ref_stats["pruned"],
                mask_mismatches=mismatches,
                ok=all(value <= 1.0 for value in worst.values()) and mismatches <= 1e-3 * elements)


# ---- agreement: each backend against the cpu backend, step by step -------------------------------

# (case, storage, steps, GradScaler scale, weight decay): every stage in fp32, the dense steps and
# the first two events in 16 bits (tests/test_rounding.py's cases).
AGREEMENT_CASES = (("fp32", "fp32", 20, None, 0.01),
                   ("fp32, GradScaler 1024", "fp32", 20, 1024.0, 0.0),
                   ("bf16, fp32 state", "bf16, fp32 state", 5, None, 0.01),
                   ("bf16", "bf16", 5, None, 0.01),
                   ("fp16", "fp16", 5, None, 0.01))


def agreement_rows(run: Run) -> list[dict]:
    return [attempt({"backend": backend, "case": case},
                    lambda backend=backend, case=case: agreement_run(run, backend, *rest))
            for backend in run.backends for case, *rest in AGREEMENT_CASES]


def agreement_optimizer(backend: str, weights, storage: Storage, device, weight_decay):
    params = [torch.nn.Parameter(w.to(device, storage.param_dtype, copy=True)) for w in weights]
    return params, MGPP([{"params": params, "prune": True}], backend=backend, lr=1e-3,
                        weight_decay=weight_decay, state_dtype=storage.state_dtype,
                        **agreement.SCHEDULE)


def agreement_run(run: Run, backend: str, storage_label: str, steps: int, grad_scale,
                  weight_decay) -> dict:
    """The backend on the device and the cpu backend take each step from the same θ, m, v and
    gradients (the backend's run is set to the cpu run's values after every step): the worst
    difference as a fraction of benchmarks/common/agreement.py's bound, θ where both runs agree on
    the pruned positions (a weight at τ's edge may fall on either side when θ differs by an ulp),
    and the largest fraction of positions pruned by one run only (docs/spec.md §4: 0.1%)."""
    if "cpu" not in mgpp_kernels.available_backends():
        raise BackendUnavailableError("the cpu backend, the baseline, is not built")
    storage = BY_LABEL[storage_label]
    weights = agreement.near_spike_weights(run.sizes.agreement, seed=1)
    baseline = agreement_optimizer("cpu", weights, storage, CPU, weight_decay)
    kernel = agreement_optimizer(backend, weights, storage, run.device, weight_decay)
    worst = {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    elements = sum(w.numel() for w in weights)
    mismatch_fraction = 0.0
    for t in range(steps):
        grads = agreement.gradients(t, weights, seed=2)
        scales = agreement.input_scales(*baseline, grads, grad_scale)
        for params, optimizer in (baseline, kernel):
            for p, g in zip(params, grads):
                p.grad = (g * (grad_scale or 1.0)).to(p.device, p.dtype)
            if grad_scale is not None:
                optimizer.grad_scale = torch.tensor(grad_scale, device=params[0].device)
            optimizer.step()
        mismatches = 0
        for a, b, scale in zip(kernel[0], baseline[0], scales):
            theta = a.detach().cpu()
            agree = (theta == 0) == (b.detach() == 0)
            mismatches += int((~agree).sum())
            worst["param"] = max(worst["param"], agreement.worst_ulp_ratio(
                theta, b.detach(), scale["param"], where=agree))
            state, cpu_state = kernel[1].state[a], baseline[1].state[b]
            for key in ("exp_avg", "exp_avg_sq"):
                worst[key] = max(worst[key], agreement.worst_ulp_ratio(
                    state[key], cpu_state[key], scale[key]))
            for key in state:
                state[key].copy_(cpu_state[key])
            with torch.no_grad():
                a.copy_(b)
        mismatch_fraction = max(mismatch_fraction, mismatches / elements)
    return dict(steps=steps, elements=elements, theta_of_bound=worst["param"],
                m_of_bound=worst["exp_avg"], v_of_bound=worst["exp_avg_sq"],
                mask_mismatch_fraction=mismatch_fraction,
                ok=all(value <= 1.0 for value in worst.values()) and mismatch_fraction <= 1e-3)


# ---- threshold: τ against kthvalue ---------------------------------------------------------------

def threshold_cases(run: Run) -> dict[str, list[torch.Tensor]]:
    """The candidate sets τ is selected over: the BERT-base candidates in fp32 and in bf16 (many
    ties), one layer with exact zeros, denormals and repeated values, and mixed dtypes."""
    bert = run.sizes.bert.candidate_shapes()
    fp32 = [p.detach() for p in make_params(bert, torch.float32, run.device, 5, grad_std=None)]
    awkward = [p.detach() for p in make_params(run.sizes.layer, torch.float32, run.device, 6,
                                               grad_std=None)]
    for tensor in awkward:
        flat = tensor.view(-1)
        flat[::3] = 0.0
        flat[1::7] = 1e-40
        flat[2::11] = -0.0125
    mixed = [t.to(dtype) for t, dtype in zip(awkward, [torch.float32, torch.bfloat16,
                                                        torch.float16] * len(awkward))]
    return {"bert-base fp32": fp32, "bert-base bf16": [t.to(torch.bfloat16) for t in fp32],
            "zeros, denormals, ties": awkward, "mixed dtypes": mixed}


def threshold_rows(run: Run) -> list[dict]:
    rows = []
    for case, tensors in threshold_cases(run).items():
        magnitudes = torch.cat([t.abs().flatten().float() for t in tensors])
        numel = magnitudes.numel()
        for k in sorted({1, int(numel * 0.3), int(numel * 0.9), numel - 1}):
            expected = torch.kthvalue(magnitudes, k).values
            for backend in run.backends:
                rows.append(attempt({"backend": backend, "case": case, "k": k},
                                    lambda backend=backend, tensors=tensors, k=k, expected=expected:
                                    threshold_row(backend, tensors, k, expected)))
        del magnitudes
    return rows


def threshold_row(backend: str, tensors, k: int, expected: torch.Tensor) -> dict:
    tau = load_backend(backend).global_threshold(tensors, k)
    exact = bits_equal(tau.reshape(()).float(), expected)
    return dict(elements=sum(t.numel() for t in tensors), tau=float(tau), kthvalue=float(expected),
                ok=exact)


# ---- N:M pools: every backend against the cpu backend, bit for bit ----------------------------

# (shape, dtype, param-group keys): a 2:4 pool, a 3:6 pool (a group size that does not divide a
# mask byte) and an unstructured pool beside them.
NM_CANDIDATES = (((96, 64), torch.float32, {"pattern": "2:4"}),
                 ((33, 16), torch.bfloat16, {"pattern": "2:4"}),
                 ((40, 18), torch.float16, {"pattern": "3:6"}),
                 ((50, 20), torch.float32, {"final_sparsity": 0.6}))
# Events at t_i = 1, 3 and the freeze at t_end = 5; lr 0 and no prior keep θ as it was, so every
# backend ranks the same values and must zero the same ones.
NM_SCHEDULE = dict(num_train_examples=NUM_TRAIN_EXAMPLES, initial_warmup_steps=1, total_steps=7,
                   pruning_interval=2, final_warmup_steps=1)


def nm_rows(run: Run) -> list[dict]:
    return [attempt({"backend": backend}, lambda backend=backend: nm_run(run, backend))
            for backend in run.backends]


def nm_optimizer(backend: str, device: torch.device, capturable: bool):
    generator = torch.Generator().manual_seed(21)
    params = [torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.05).to(device, dtype))
              for shape, dtype, _ in NM_CANDIDATES]
    groups = [{"params": [p], "prune": True, **keys}
              for p, (_, _, keys) in zip(params, NM_CANDIDATES)]
    return params, MGPP(groups, lr=0.0, weight_decay=0.0, use_prior=False, backend=backend,
                        capturable=capturable, **NM_SCHEDULE)


def nm_run(run: Run, backend: str) -> dict:
    """The pools through the schedule on the backend (host and device schedules) and on the cpu
    backend: every candidate, keep mask and pool τ bit for bit, and the N:M candidates N:M."""
    if "cpu" not in mgpp_kernels.available_backends():
        raise BackendUnavailableError("the cpu backend, the baseline, is not built")
    baseline, baseline_optimizer = nm_optimizer("cpu", CPU, capturable=False)
    runs = {capturable: nm_optimizer(backend, run.device, capturable)
            for capturable in (False, True)}
    for t in range(NM_SCHEDULE["total_steps"]):
        generator = torch.Generator().manual_seed(100 + t)
        grads = [torch.randn(p.shape, generator=generator) for p in baseline]
        for params, optimizer in [(baseline, baseline_optimizer), *runs.values()]:
            for p, g in zip(params, grads):
                p.grad = g.to(p.device, p.dtype)
            optimizer.step()
    expected_taus = [pool["tau"] for pool in baseline_optimizer.stats()["pools"]]
    same = True
    for params, optimizer in runs.values():
        same = same and all(bits_equal(p, q) for p, q in zip(params, baseline))
        same = same and all(bits_equal(optimizer.state[p]["keep_mask"],
                                       baseline_optimizer.state[q]["keep_mask"])
                            for p, q in zip(params, baseline))
        same = same and [pool["tau"] for pool in optimizer.stats()["pools"]] == expected_taus
    structured = all(
        int((p.detach().reshape(-1, m) != 0).sum(dim=1).max()) <= n
        for p, (_, _, keys) in zip(runs[True][0], NM_CANDIDATES) if "pattern" in keys
        for n, m in [map(int, keys["pattern"].split(":"))])
    return dict(pools=len(expected_taus), same_as_cpu=same, nm_structure=structured,
                ok=same and structured)


# ---- a 2:4 Linear against the dense one ----------------------------------------------------------

# (out features, in features, tokens) in float16: a BERT-base and a LLaMA-7B MLP projection.
SEMI_STRUCTURED_SHAPES = ((3072, 768, 8192), (11008, 4096, 4096))


def semi_structured_rows(run: Run) -> list[dict]:
    if run.device.type != "cuda":
        return [{"skipped": "torch.sparse.to_sparse_semi_structured runs on CUDA only"}]
    return [attempt({"out": out, "in": inputs, "tokens": tokens},
                    lambda shape=(out, inputs, tokens): semi_structured_row(run, *shape))
            for out, inputs, tokens in SEMI_STRUCTURED_SHAPES]


def semi_structured_row(run: Run, out: int, inputs: int, tokens: int) -> dict:
    """The forward of a 2:4-pruned float16 Linear, dense and as exported by to_semi_structured
    (mgpp_kernels.integrations.export), timed back to back; and their outputs' difference."""
    from mgpp_kernels.integrations.export import to_semi_structured
    generator = torch.Generator().manual_seed(31)
    weight = torch.randn(out, inputs, generator=generator).to(run.device, torch.float16)
    groups = weight.view(-1, 4)
    smallest = groups.abs().argsort(dim=1)[:, :2]
    groups.scatter_(1, smallest, 0.0)
    dense = torch.nn.Sequential(torch.nn.Linear(inputs, out, bias=False)).to(run.device,
                                                                           torch.float16)
    with torch.no_grad():
        dense[0].weight.copy_(weight)
    sparse = copy.deepcopy(dense)
    to_semi_structured(sparse, names=["0.weight"])
    x = torch.randn(tokens, inputs, generator=generator).to(run.device, torch.float16)
    with torch.no_grad():
        difference = float((sparse(x) - dense(x)).abs().max())
        scale = float(dense(x).abs().max())
        times = {}
        for name, module in (("dense", dense), ("2:4", sparse)):
            for _ in range(3):
                module(x)
            times[name], _ = back_to_back_seconds(lambda module=module: module(x), 20, run.device)
    return dict(dense_ms=times["dense"] * 1e3, sparse_ms=times["2:4"] * 1e3,
                speedup=times["dense"] / times["2:4"], max_difference=difference,
                ok=difference <= 1e-2 * scale)


# ---- host syncs under a GradScaler ---------------------------------------------------------------

SYNC_STEPS = 4   # after the first step: events at t = 2 and 4


def sync_rows(run: Run) -> list[dict]:
    return [attempt({"backend": backend, "capturable": capturable},
                    lambda backend=backend, capturable=capturable:
                    count_syncs(run, backend, capturable))
            for backend in run.backends for capturable in (False, True)]


def synchronisations(device: torch.device, fn: Callable[[], object]) -> int | None:
    """The synchronising CUDA calls fn makes, from torch.cuda.set_sync_debug_mode("warn"); None
    without a GPU (fn runs all the same)."""
    if device.type != "cuda":
        fn()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def count_syncs(run: Run, backend: str, capturable: bool) -> dict:
    """GradScaler.step(optimizer) on one layer, gradients scaled on the device: the first step
    (which moves the schedule to the device and builds its tables) apart, then SYNC_STEPS more."""
    device = run.device
    params = make_params(run.sizes.layer, torch.float32, device, seed=7)
    grads = [p.grad.clone() for p in params]
    optimizer = MGPP([{"params": params, "prune": True}], lr=LR, weight_decay=0.0,
                     backend=backend, capturable=capturable, pruning_interval=2, **STEP_SCHEDULE)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    counts = []
    for _ in range(1 + SYNC_STEPS):
        for p, g in zip(params, grads):
            p.grad.copy_(scaler.scale(g))
        counts.append(synchronisations(device, lambda: scaler.step(optimizer)))
        scaler.update()
    first, rest = counts[0], counts[1:]
    row = dict(schedule_step=optimizer.stats()["step"], first_step_syncs=first, steps=SYNC_STEPS)
    if device.type != "cuda":
        return row | {"syncs": None, "note": "no CUDA device: not counted"}
    return row | {"syncs": sum(rest), "ok": sum(rest) == 0}


# ---- CUDA-graph replay against eager steps -------------------------------------------------------

# t_i = 2, events at t = 2 (s_i), 3, 6 and 9, the freeze at t_end = 16 - 3 - 1 = 12.
GRAPH_SCHEDULE = dict(num_train_examples=NUM_TRAIN_EXAMPLES, initial_warmup_steps=2,
                      total_steps=16, final_warmup_steps=3, pruning_interval=3,
                      initial_sparsity=0.5, final_sparsity=0.9)
GRAPH_WARMUP_CALLS = 3          # t = 0, 1, 2 run eagerly: every kernel compiled, the tables built
GRAPH_REPLAYED_STEPS = 10       # t = 3 to 12: the events at 3, 6 and 9, the freeze at 12
GRAPH_SKIPPED_CALL = 6          # a call among them with found_inf = 1: nothing moves


def graph_rows(run: Run) -> list[dict]:
    return [attempt({"backend": backend}, lambda backend=backend: graph_replay(run, backend))
            for backend in run.backends]


class CallTimes:
    """The device and host time of single calls issued without waiting in between: CUDA events
    around each on a GPU, read after the last; the wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.device_marks: list = []
        self.host_seconds: list[float] = []

    def __call__(self, fn: Callable[[], object]) -> None:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            started = time.perf_counter()
            fn()
            self.host_seconds.append(time.perf_counter() - started)
            end.record()
            self.device_marks.append((start, end))
            return
        started = time.perf_counter()
        fn()
        self.host_seconds.append(time.perf_counter() - started)
        self.device_marks.append(self.host_seconds[-1])

    def device_seconds(self) -> list[float]:
        if self.device.type != "cuda":
            return list(self.device_marks)
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in self.device_marks]


def graph_run(run: Run, backend: str, captured: bool):
    """The graph replay's calls of MGPP `backend` with capturable=True (a GradScaler's scale and
    found_inf in static tensors, new gradients copied into the static ones before each call), the
    step captured once after the warm-up and replayed (`captured`, on a GPU) or run eagerly: the
    parameters, the optimizer, whether a graph was captured, and the times of the real steps."""
    device = run.device
    params = make_params(run.sizes.layer, torch.float32, device, seed=2)
    optimizer = MGPP([{"params": params, "prune": True}], lr=1e-3, weight_decay=0.0,
                     backend=backend, capturable=True, **GRAPH_SCHEDULE)
    optimizer.grad_scale = torch.tensor(1.0, device=device)
    optimizer.found_inf = torch.tensor(0.0, device=device)
    generator = torch.Generator(device=device).manual_seed(3)
    calls = GRAPH_WARMUP_CALLS + GRAPH_REPLAYED_STEPS + 1
    bank = [[torch.randn(p.shape, device=device, generator=generator) * 1e-3 for p in params]
            for _ in range(calls)]

    def load(call: int) -> None:
        for p, g in zip(params, bank[call]):
            p.grad.copy_(g)
        optimizer.found_inf.fill_(1.0 if call == GRAPH_SKIPPED_CALL else 0.0)

    replay = optimizer.step
    graphs = captured and device.type == "cuda"
    warmup_stream = torch.cuda.Stream() if graphs else None
    if graphs:   # the warm-up before a capture runs on a side stream (torch.cuda.graph's rule)
        warmup_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup_stream) if graphs else contextlib.nullcontext():
        for call in range(GRAPH_WARMUP_CALLS):
            load(call)
            optimizer.step()
    if graphs:
        torch.cuda.current_stream().wait_stream(warmup_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):   # records the step without running it; the replays do
            optimizer.step()
        replay = graph.replay
    times = CallTimes(device)
    for call in range(GRAPH_WARMUP_CALLS, calls):
        load(call)
        if call == GRAPH_SKIPPED_CALL:
            replay()
        else:
            times(replay)
    return params, optimizer, graphs, times


def graph_replay(run: Run, backend: str) -> dict:
    eager_params, eager, _, eager_times = graph_run(run, backend, captured=False)
    graph_params, graphed, captured, graph_times = graph_run(run, backend, captured=True)
    identical = all(bits_equal(a, b) for a, b in zip(eager_params, graph_params)) and all(
        eager.state[a].keys() == graphed.state[b].keys()
        and all(bits_equal(eager.state[a][key], graphed.state[b][key]) for key in eager.state[a])
        for a, b in zip(eager_params, graph_params))
    eager_stats, graph_stats = eager.stats(), graphed.stats()
    replay_seconds, eager_seconds = graph_times.device_seconds(), eager_times.device_seconds()
    return dict(captured=captured, replayed_steps=len(replay_seconds), skipped_calls=1,
                stage=graph_stats["stage"], step=graph_stats["step"],
                stats_equal=eager_stats == graph_stats, identical=identical,
                replay_ms=1e3 * statistics.mean(replay_seconds),
                eager_ms=1e3 * statistics.mean(eager_seconds),
                replay_host_ms=1e3 * statistics.mean(graph_times.host_seconds),
                eager_host_ms=1e3 * statistics.mean(eager_times.host_seconds),
                ok=identical and eager_stats == graph_stats
                and (captured or run.device.type != "cuda"))


# ---- speed rows ----------------------------------------------------------------------------------

def optimizer_for(name: str, params, event: bool, storage: Storage):
    """An optimizer by its row name: "AdamW fused", "AdamW capturable", "MGPP <backend>" or
    "MGPP <backend> capturable" (the schedule on the device)."""
    if name == "AdamW fused":
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    if name == "AdamW capturable":
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, capturable=True,
                                 foreach=True)
    words = name.split()
    return MGPP([{"params": params, "prune": True}], lr=LR, weight_decay=0.0,
                backend=words[1], capturable=words[-1] == "capturable",
                state_dtype=storage.state_dtype,
                pruning_interval=EVENT_INTERVAL if event else NO_EVENT_INTERVAL, **STEP_SCHEDULE)


def bytes_per_element(param: torch.Tensor, optimizer, event: bool) -> int:
    """Bytes a step must move per element, from the row's own tensors: θ read and written, g
    read, m and v read and written; an event reads and writes θ once more (docs/spec.md §3)."""
    state = optimizer.state[param]
    theta = param.element_size()
    moments = state["exp_avg"].element_size() + state["exp_avg_sq"].element_size()
    update = 2 * theta + param.grad.element_size() + 2 * moments
    return update + 2 * theta if event else update


def row_names(run: Run, storage: Storage, capturable: bool) -> list[tuple[str, bool]]:
    """(optimizer, event) of the rows of one storage: fused AdamW where it keeps the same state
    (its state is in the parameter dtype), and capturable AdamW on a GPU; every MGPP backend
    without and with an event."""
    names = []
    if storage.runs_on_adamw:
        names.append(("AdamW fused", False))
        if capturable and run.device.type == "cuda":
            names.append(("AdamW capturable", False))
    suffixes = ("", " capturable") if capturable else ("",)
    return names + [(f"MGPP {backend}{suffix}", event) for backend in run.backends
                    for suffix in suffixes for event in (False, True)]


@dataclass
class TimedRow:
    row: dict
    step: Callable[[], object]
    optimizer: object
    device_seconds: list
    host_seconds: list


def step_rows(run: Run, workload: str) -> list[dict]:
    """Every storage's rows on `workload`; the capturable rows on the BERT-base candidates only
    (on 1B elements, five optimizers of 12 bytes per element fill most of an 80 GB GPU)."""
    bert = workload == "bert-base candidates"
    shapes = run.sizes.bert.candidate_shapes() if bert else run.sizes.large
    timing = run.sizes.bert_timing if bert else run.sizes.large_timing
    rows = []
    for storage in STEP_STORAGES:
        rows += step_group(run, workload, shapes, storage, timing, capturable=bert)
    return rows


def step_group(run: Run, workload: str, shapes, storage: Storage, timing: Timing,
               capturable: bool) -> list[dict]:
    """The rows of one storage, each on its own parameters (the same values) and all on the same
    gradients: warmed up, then taking turns of `timing.calls` back-to-back steps, each round
    closed by a turn of the device copy, whose GB/s is the rows' baseline."""
    device = run.device
    grads = [p.grad for p in make_params(shapes, storage.param_dtype, device, seed=1)]
    elements = sum(g.numel() for g in grads)
    timed, rows = [], []
    for name, event in row_names(run, storage, capturable):
        identity = dict(workload=workload, precision=storage.label, optimizer=name, event=event)
        try:
            params = make_params(shapes, storage.param_dtype, device, seed=0, grad_std=None)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer = optimizer_for(name, params, event, storage)
            for _ in range(timing.warmup):
                optimizer.step()
            state_dtype = optimizer.state[params[0]]["exp_avg"].dtype
            timed.append(TimedRow(identity | dict(
                param_dtype=dtype_name(storage.param_dtype), state_dtype=dtype_name(state_dtype),
                bytes_per_element=bytes_per_element(params[0], optimizer, event),
                elements=elements), optimizer.step, optimizer, [], []))
        except Exception as error:  # noqa: BLE001 - recorded in the row
            rows.append(identity | failure(error))
        params = optimizer = None   # a failed row's tensors go before the next row's
    copy, copied_bytes = copy_call(run.sizes.copy_elements, device)
    copy_seconds = []
    for _ in range(timing.warmup):
        copy()
    for _ in range(timing.rounds):
        for entry in [e for e in timed if "error" not in e.row]:
            try:
                seconds, host = back_to_back_seconds(entry.step, timing.calls, device)
            except Exception as error:  # noqa: BLE001 - recorded in the row
                entry.row.update(failure(error))
                continue
            entry.device_seconds.append(seconds)
            entry.host_seconds.append(host)
        copy_seconds.append(back_to_back_seconds(copy, timing.calls, device)[0])
    copy_gbps = copied_bytes / statistics.median(copy_seconds) / 1e9
    for entry in timed:
        row = entry.row
        if "error" not in row:
            seconds = statistics.median(entry.device_seconds)
            row.update(ms=seconds * 1e3, host_ms=statistics.median(entry.host_seconds) * 1e3,
                       gbps=row["bytes_per_element"] * elements / seconds / 1e9)
            row["copy_fraction"] = row["gbps"] / copy_gbps
            if row["optimizer"].startswith("MGPP"):
                row["event_sparsity"] = entry.optimizer.stats()["event_sparsity"]
        rows.append(row)
    fused = next((r for r in rows if r["optimizer"] == "AdamW fused" and "ms" in r), None)
    for row in rows:
        # Against fused AdamW where both move the same bytes without an event.
        if fused is not None and "ms" in row and row["state_dtype"] == fused["state_dtype"]:
            row["vs_fused_adamw"] = row["ms"] / fused["ms"]
    rows.append(dict(workload=workload, precision=storage.label, optimizer="device copy",
                     event=False, param_dtype="float32", bytes_per_element=copied_bytes
                     // run.sizes.copy_elements, elements=run.sizes.copy_elements,
                     ms=statistics.median(copy_seconds) * 1e3, gbps=copy_gbps, copy_fraction=1.0))
    return rows


# ---- τ selection time ----------------------------------------------------------------------------

def selection_rows(run: Run) -> list[dict]:
    """τ at 90% over the BERT-base candidates by each backend's radix selection and by torch."""
    params = [p.detach() for p in make_params(run.sizes.bert.candidate_shapes(), torch.float32,
                                              run.device, seed=1, grad_std=None)]
    numel = sum(p.numel() for p in params)
    k = int(numel * 0.9)

    def kthvalue():
        return torch.kthvalue(torch.cat([p.abs().flatten() for p in params]), k).values

    def topk():
        return torch.topk(torch.cat([p.abs().flatten() for p in params]), numel - k + 1,
                          largest=True).values[-1]

    methods = {"torch.kthvalue": kthvalue, "torch.topk": topk}
    for backend in run.backends:
        methods[f"radix {backend}"] = (lambda backend=backend:
                                       load_backend(backend).global_threshold(params, k))
    expected = kthvalue()
    rows = [attempt({"method": name, "elements": numel, "k": k},
                    lambda select=select: time_selection(run, select, expected))
            for name, select in methods.items()]
    kth = next((r["ms"] for r in rows if r["method"] == "torch.kthvalue" and "ms" in r), None)
    for row in rows:
        if kth is not None and "ms" in row:
            row["speedup_vs_kthvalue"] = kth / row["ms"]
    return rows


def time_selection(run: Run, select: Callable[[], torch.Tensor], expected) -> dict:
    same = bits_equal(select().reshape(()).float(), expected)
    seconds, host = back_to_back_seconds(select, run.sizes.selection_calls, run.device)
    return dict(ms=seconds * 1e3, host_ms=host * 1e3, same_tau=same, ok=same)


# ---- sections, results and the summary -----------------------------------------------------------

class Section(NamedTuple):
    key: str
    title: str
    rows: Callable[[Run], list[dict]]


PARTS = {
    "smoke": [Section("smoke", "Smoke: one step of each backend against the reference "
                      "(fractions of the §4 bound)", smoke_rows)],
    "bench": [
        Section("agreement", "Each backend against the cpu backend from the same inputs "
                "(fractions of the §4 bound across backends)", agreement_rows),
        Section("threshold", "τ against torch.kthvalue, bit for bit", threshold_rows),
        Section("nm_pools", "N:M pools (2:4, 3:6) beside an unstructured one, against the cpu "
                "backend, bit for bit", nm_rows),
        Section("host_syncs", "Synchronising calls in GradScaler.step(optimizer)", sync_rows),
        Section("graph_replay", "CUDA-graph replays of capturable=True against eager steps",
                graph_rows),
        Section("steps_bert_base", "Steps on the BERT-base candidates",
                lambda run: step_rows(run, "bert-base candidates")),
        Section("steps_1b", "Steps on 1B elements", lambda run: step_rows(run, "1B elements")),
        Section("selection", "τ selection at 90% on the BERT-base candidates", selection_rows),
        Section("semi_structured", "A 2:4 float16 Linear (to_sparse_semi_structured) against "
                "the dense one, forward", semi_structured_rows),
    ],
}
SECTION_ORDER = [section.key for part in PARTS.values() for section in part]


def injected(part: str) -> bool:
    """Whether MGPP_GPU_RUN_FAIL names this part's stage (or "all")."""
    names = os.environ.get("MGPP_GPU_RUN_FAIL", "").split(",")
    return part in names or "all" in names


def section_ok(entry: dict) -> bool:
    return "error" not in entry and all(
        "error" not in row and row.get("ok", True) is not False for row in entry["rows"])


def run_part(run: Run, part: str, document: dict, output: Path) -> None:
    for index, section in enumerate(PARTS[part]):
        print(f"-- {section.title}", flush=True)
        started = time.perf_counter()
        try:
            if index == 0 and injected(part):
                raise RuntimeError(f"failure injected (MGPP_GPU_RUN_FAIL={part})")
            entry = {"rows": section.rows(run)}
        except Exception as error:  # noqa: BLE001 - recorded in the section
            entry = failure(error)
        entry["seconds"] = time.perf_counter() - started
        entry["ok"] = section_ok(entry)
        document["sections"][section.key] = entry
        write_results(document, output)
        print(section_markdown(section.key, entry), flush=True)


def format_value(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def section_markdown(key: str, entry: dict) -> str:
    title = next(s.title for part in PARTS.values() for s in part if s.key == key)
    status = "ok" if entry["ok"] else "FAILED"
    lines = [f"## {title} ({status}, {entry['seconds']:.1f} s)", ""]
    if "error" in entry:
        return "\n".join(lines + [f"error: {entry['error']}", ""])
    columns = list(dict.fromkeys(column for row in entry["rows"] for column in row))
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(format_value(row.get(column)) for column in columns) + " |"
              for row in entry["rows"]]
    return "\n".join(lines + [""])


def markdown(document: dict) -> str:
    unavailable = ", ".join(f"{name} ({why})" for name, why in document["unavailable"].items())
    lines = [f"# GPU run: {document['device']}", "",
             f"torch {document['torch']}, triton {document['triton']}; backends under test: "
             f"{', '.join(document['backends']) or 'none'}"
             + (f"; not available: {unavailable}" if unavailable else "")
             + ("; dry run (CPU, interpreter, tiny sizes)" if document["dry_run"] else ""), ""]
    if "error" in document:
        lines += [f"error: {document['error']}", ""]
    for key in SECTION_ORDER:
        if key in document["sections"]:
            lines.append(section_markdown(key, document["sections"][key]))
    return "\n".join(lines)


def write_results(document: dict, output: Path) -> None:
    (output / "gpu_bench.json").write_text(json.dumps(document, indent=1))
    (output / "gpu_bench.md").write_text(markdown(document))


def summary_lines(document: dict, part: str) -> list[str]:
    """The key numbers of this part, for run.sh's summary."""
    sections = document["sections"]
    failed = [f"{s.key} ({sections[s.key].get('error') or 'see its rows'})"
              for s in PARTS[part] if s.key in sections and not sections[s.key]["ok"]]
    lines = []
    if part == "smoke" and "rows" in sections.get("smoke", {}):
        lines.append("smoke: " + ", ".join(
            f"{r['backend']} {r['error'] if 'error' in r else 'ok' if r['ok'] else 'OUT OF BOUNDS'}"
            + (f" (θ {r['theta_of_bound']:.2g}, m {r['m_of_bound']:.2g}, v {r['v_of_bound']:.2g}"
               " of the bound)" if "theta_of_bound" in r else "")
            for r in sections["smoke"]["rows"]))
    if part == "bench":
        checks = []
        for key, label in (("agreement", "agreement with cpu"), ("threshold", "τ exact"),
                           ("host_syncs", "no host sync"), ("graph_replay", "graph = eager")):
            rows = sections.get(key, {}).get("rows")
            if rows is not None:
                checked = [r for r in rows if "ok" in r]
                checks.append(f"{label} {sum(r['ok'] for r in checked)}/{len(checked)}"
                              + (f" ({len(rows) - len(checked)} not checked)"
                                 if len(checked) < len(rows) else ""))
        lines.append("checks: " + ", ".join(checks))
        for key in ("steps_bert_base", "steps_1b"):
            for precision in (s.label for s in STEP_STORAGES):
                lines += step_summary(sections.get(key, {}).get("rows", []), precision)
    if failed:
        lines.append("failed: " + "; ".join(failed))
    return lines


def step_summary(rows: list[dict], precision: str) -> list[str]:
    """One line per workload and storage: the copy's GB/s, fused AdamW's ms, and each optimizer's
    time without / with an event, as a ratio to fused AdamW where both move the same bytes (else
    in ms)."""
    rows = [r for r in rows if r["precision"] == precision and "ms" in r]
    if not rows:
        return []
    parts, times = [], {}
    for r in rows:
        if r["optimizer"] == "device copy":
            parts.insert(0, f"copy {r['gbps']:.0f} GB/s")
        elif r["optimizer"] == "AdamW fused":
            parts.append(f"fused AdamW {r['ms']:.3g} ms")
        else:
            time = f"{r['vs_fused_adamw']:.2f}x" if "vs_fused_adamw" in r else f"{r['ms']:.3g} ms"
            times.setdefault(r["optimizer"].removeprefix("MGPP "), []).append(time)
    parts += [f"{name} {' / '.join(values)}" for name, values in times.items()]
    return [f"{rows[0]['workload']}, {precision} (no event / event): " + ", ".join(parts)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def discover(asked: list[str], dry_run: bool) -> tuple[list[str], dict[str, str]]:
    """The backends of `asked` that are built, and why each other one is not."""
    built, unavailable = [], {}
    for name in asked:
        if injected("build") and name == ("cpu" if dry_run else "cuda"):
            unavailable[name] = "the build failed (MGPP_GPU_RUN_FAIL=build)"
            continue
        try:
            load_backend(name)
        except (BackendUnavailableError, ValueError) as error:
            unavailable[name] = str(error).split(";")[0]
            continue
        built.append(name)
    return built, unavailable


def device_description(dry_run: bool) -> str:
    if dry_run:
        return "cpu (dry run)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor}, {memory:.0f} GiB)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--part", choices=sorted(PARTS), default="bench")
    parser.add_argument("--backends", help="comma-separated (default cuda,triton; cpu,triton in "
                                           "the dry run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU (triton through the interpreter, cpu for cuda)")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if args.backends is None:
        args.backends = "cpu,triton" if args.dry_run else "cuda,triton"
    asked = [name for name in args.backends.split(",") if name]
    backends, unavailable = discover(asked, args.dry_run)
    device = CPU if args.dry_run else torch.device("cuda")
    document = {"sections": {}}
    previous = output / "gpu_bench.json"
    if previous.exists():   # the smoke part's results stay beside the bench part's
        try:
            document["sections"] = json.loads(previous.read_text())["sections"]
        except (ValueError, KeyError):
            print(f"{previous} is not a results file: rewritten", file=sys.stderr)
    document.update(
        device=device_description(args.dry_run), dry_run=args.dry_run, torch=torch.__version__,
        triton=triton_version(), backends=backends, unavailable=unavailable)
    if not args.dry_run and not torch.cuda.is_available():
        document["error"] = "no CUDA device: run with --dry-run"
        write_results(document, output)
        print(f"summary: {document['error']}")
        return 1
    run = Run(device, args.dry_run, DRY_RUN_SIZES if args.dry_run else GPU_SIZES, backends,
              unavailable)
    write_results(document, output)
    run_part(run, args.part, document, output)
    for line in summary_lines(document, args.part):
        print(f"summary: {line}")
    if unavailable:
        print("summary: not available: " + "; ".join(f"{name}: {why}"
                                                      for name, why in unavailable.items()))
    return 0 if all(document["sections"][s.key]["ok"] for s in PARTS[args.part]) else 1


if __name__ == "__main__":
    sys.exit(main())
