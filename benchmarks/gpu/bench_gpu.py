"""The GPU benchmark of benchmarks/gpu/run.sh: MGPP `cuda` and `triton` against
torch.optim.AdamW(fused=True) (and capturable=True) on one device, all in one process, so that
every ratio is measured side by side.

    python benchmarks/gpu/bench_gpu.py OUT_DIR [--dry-run]

Measures, in fp32 and in bf16 with bf16 state, on the BERT-base candidate set and on about 1B
elements (a 7B LLaMA's layers per rank): a step without and with a pruning event, τ selection
against torch.kthvalue and torch.topk on the same weights (same τ asserted), effective GB/s (the
bytes of benchmarks/common/storage.py) against the device-to-device copy bandwidth measured in the
same run, whether step() synchronises with the host under a GradScaler
(torch.cuda.set_sync_debug_mode("error")), and whether a CUDA graph of one captured step of
MGPP cuda and of MGPP triton with capturable=True, replayed through events, skipped steps and the
freeze, equals eager steps bit for bit (and how long a replay takes). Writes OUT_DIR/gpu_bench.json and
OUT_DIR/gpu_bench.md and prints the table.

--dry-run: tiny sizes on the CPU, the triton backend through the interpreter and the cpu backend
standing in for cuda, so that the script runs in the test suite and cannot rot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch

# The checkout's mgpp_kernels and benchmarks.common.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mgpp_kernels  # noqa: E402
from mgpp_kernels import MGPP  # noqa: E402
from mgpp_kernels.workloads import BERT_BASE, BertShapes, random_parameters  # noqa: E402

from benchmarks.common.machine import triton_version  # noqa: E402
from benchmarks.common.settings import LR, NUM_TRAIN_EXAMPLES  # noqa: E402
from benchmarks.common.storage import BF16, FP32, Storage  # noqa: E402
from benchmarks.common.timing import copy_bandwidth, median_time  # noqa: E402

LLAMA_LAYER_ELEMENTS = 1 << 30   # about a 7B LLaMA's decoder layers held by one rank
# The dry run's sizes: a few interpreted Triton programs per step.
DRY_RUN_BERT = BertShapes(layers=1, hidden=32)
DRY_RUN_LARGE_ELEMENTS = 1 << 14
# T = 20,000 (t_end is never reached): the device schedule's table has a row per step up to t_end.
SCHEDULE = dict(num_train_examples=NUM_TRAIN_EXAMPLES, initial_warmup_steps=0, total_steps=20_000,
                final_warmup_steps=0, initial_sparsity=0.5, final_sparsity=0.9)
STORAGES = (FP32, BF16)


def workloads(dry_run: bool) -> dict[str, list[tuple[int, ...]]]:
    if dry_run:
        return {"bert-base candidates": DRY_RUN_BERT.candidate_shapes(),
                "1B elements": [(DRY_RUN_LARGE_ELEMENTS // 4,)] * 4}
    # The large set as 64 tensors of 4096-wide rows, the shape of a model's layer weights.
    return {"bert-base candidates": BERT_BASE.candidate_shapes(),
            "1B elements": [(LLAMA_LAYER_ELEMENTS // (64 * 4096), 4096)] * 64}


def make_params(shapes, dtype, device, seed=0):
    """Parameters with normal(0, 0.04) values and gradients, drawn on the device (a billion
    draws on the host would take longer than the measurements)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return random_parameters(shapes, generator, std=0.04, grad_std=1e-3, dtype=dtype)


def optimizer_for(name: str, params, interval: int, storage: Storage = FP32):
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
                state_dtype=storage.state_dtype, pruning_interval=interval, **SCHEDULE)


def step_rows(device, backends, dry_run, bandwidth) -> list[dict]:
    """A step of every optimizer in every storage, without and with an event: its time, the GB/s
    of the bytes the storage's step must move, and their fraction of the copy bandwidth."""
    rows = []
    repeats = 1 if dry_run else 10
    for workload, shapes in workloads(dry_run).items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        for storage in STORAGES:
            # capturable=True takes GPU tensors only.
            peers = ["AdamW fused", "AdamW capturable"] if device.type == "cuda" else ["AdamW fused"]
            mgpp = [f"MGPP {b}{suffix}" for b in backends for suffix in ("", " capturable")]
            for name in [*peers, *mgpp]:
                params = make_params(shapes, storage.param_dtype, device)
                events = [False, True] if name.startswith("MGPP") else [False]
                for event in events:
                    # An interval of 1 prunes every step; a huge one never after t_i = 0.
                    optimizer = optimizer_for(name, params, 1 if event else 10**5, storage)
                    optimizer.step()  # t = 0 prunes to s_i: later steps are plain or events
                    seconds = median_time(optimizer.step, repeats, device=device)
                    gbps = storage.step_bytes(event) * numel / seconds / 1e9
                    rows.append(dict(workload=workload, precision=storage.label, optimizer=name,
                                     event=event, elements=numel, ms=seconds * 1e3, gbps=gbps,
                                     copy_fraction=gbps / bandwidth))
                del params
    for row in rows:
        fused = next(r for r in rows if r["workload"] == row["workload"]
                     and r["optimizer"] == "AdamW fused" and r["precision"] == row["precision"])
        row["vs_fused_adamw"] = row["ms"] / fused["ms"]
    return rows


def selection_rows(device, backends, dry_run) -> list[dict]:
    """τ over the BERT-base candidates by each backend's radix selection and by torch."""
    shapes = workloads(dry_run)["bert-base candidates"]
    params = [p.detach() for p in make_params(shapes, torch.float32, device, seed=1)]
    numel = sum(p.numel() for p in params)
    k = int(numel * 0.9)
    expected = torch.kthvalue(torch.cat([p.abs().flatten() for p in params]), k).values
    methods = {
        "torch.kthvalue": lambda: torch.kthvalue(torch.cat([p.abs().flatten() for p in params]),
                                                 k).values,
        "torch.topk": lambda: torch.topk(torch.cat([p.abs().flatten() for p in params]),
                                         numel - k + 1, largest=True).values[-1],
    }
    for backend in backends:
        methods[f"radix {backend}"] = (
            lambda backend=backend: mgpp_kernels.backends.load_backend(backend)
            .global_threshold(params, k))
    rows = []
    for name, select in methods.items():
        tau = select()
        if not torch.equal(tau.reshape(()).float(), expected):
            raise AssertionError(f"{name} selected {float(tau)}, kthvalue {float(expected)}")
        seconds = median_time(select, 1 if dry_run else 5, device=device)
        rows.append(dict(method=name, elements=numel, ms=seconds * 1e3))
    kth = next(r["ms"] for r in rows if r["method"] == "torch.kthvalue")
    for row in rows:
        row["speedup_vs_kthvalue"] = kth / row["ms"]
    return rows


def sync_rows(device, backends) -> list[dict]:
    """Whether step() synchronises with the host under a GradScaler (CUDA only): the step runs
    under torch.cuda.set_sync_debug_mode("error"), which raises at the first synchronisation."""
    if device.type != "cuda":
        return [dict(backend=b, syncs=None, note="no GPU: not measured") for b in backends]
    rows = []
    for backend in backends:
        params = make_params(BERT_BASE.layer_candidate_shapes(), torch.float32, device)
        optimizer = optimizer_for(f"MGPP {backend}", params, 10**5)
        scaler = torch.amp.GradScaler("cuda")
        for p in params:
            p.grad.mul_(scaler.get_scale())
        scaler.unscale_(optimizer)   # outside the checked region: GradScaler's own work
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(optimizer)
            rows.append(dict(backend=backend, syncs=0))
        except RuntimeError as error:
            rows.append(dict(backend=backend, syncs=None,
                             note=f"synchronised: {str(error).splitlines()[0][:120]}"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return rows


# The graph-replay run: events at t_i = 2 and every 3 steps, the freeze at t_end = T - 6, skipped
# steps (found_inf = 1) at two step calls; the dry run's is shorter (the interpreter is slow).
GRAPH_STEPS = {False: 40, True: 12}
GRAPH_WARMUP_STEPS = 3
GRAPH_SKIPPED_CALLS = (5, 9)


def graph_replay(device, backend, dry_run) -> dict:
    """One step of MGPP `backend` (capturable=True, a GradScaler's scale and found_inf in static
    tensors) captured in a CUDA graph after warm-up steps, replayed for every later step with new
    gradients copied into the static ones, against the same steps run eagerly: parameters and
    state bit for bit, and the time of a replay against an eager step. Without a GPU (the dry
    run) the "replays" are eager calls: only the bookkeeping runs."""
    shapes = workloads(dry_run)["bert-base candidates"][:2 if dry_run else 8]
    schedule = dict(num_train_examples=NUM_TRAIN_EXAMPLES, initial_warmup_steps=2,
                    total_steps=GRAPH_STEPS[dry_run], final_warmup_steps=5, pruning_interval=3,
                    initial_sparsity=0.5, final_sparsity=0.9)
    calls = schedule["total_steps"] + len(GRAPH_SKIPPED_CALLS)
    generator = torch.Generator(device=device).manual_seed(3)
    runs = []
    for captured in (False, True):
        params = make_params(shapes, torch.float32, device, seed=2)
        optimizer = MGPP([{"params": params, "prune": True}], lr=1e-3, weight_decay=0.0,
                         backend=backend, capturable=True, **schedule)
        optimizer.grad_scale = torch.tensor(1.0, device=device)
        optimizer.found_inf = torch.tensor(0.0, device=device)
        generator.manual_seed(3)
        graph = None
        for call in range(calls):
            for p in params:
                p.grad.copy_(torch.randn(p.shape, device=device, generator=generator) * 1e-3)
            optimizer.found_inf.fill_(1.0 if call in GRAPH_SKIPPED_CALLS else 0.0)
            if not captured or call < GRAPH_WARMUP_STEPS or device.type != "cuda":
                optimizer.step()
                continue
            if graph is None:
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):   # records the step; the replay runs it
                    optimizer.step()
            graph.replay()
        runs.append((params, optimizer, graph))
    (eager_params, eager, _), (graph_params, graphed, graph) = runs
    identical = all(torch.equal(a, b) for a, b in zip(eager_params, graph_params)) and all(
        torch.equal(eager.state[a][key], graphed.state[b][key])
        for a, b in zip(eager_params, graph_params) for key in eager.state[a])
    result = dict(backend=backend, captured=graph is not None, steps=calls, identical=identical,
                  eager_stats=eager.stats(), replayed_stats=graphed.stats())
    if graph is not None:
        graphed.found_inf.fill_(1.0)   # timed replays skip: nothing moves
        eager.found_inf.fill_(1.0)
        result["replay_ms"] = median_time(graph.replay, 20, device=device) * 1e3
        result["eager_ms"] = median_time(eager.step, 20, device=device) * 1e3
    return result


def markdown(result: dict) -> str:
    lines = [f"# GPU benchmark: {result['device']}", "",
             f"torch {result['torch']}, triton {result['triton']}, copy bandwidth "
             f"{result['copy_gbps']:.1f} GB/s", "",
             "| workload | precision | optimizer | event | ms | GB/s | of copy | vs fused AdamW |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["steps"]:
        lines.append(f"| {r['workload']} | {r['precision']} | {r['optimizer']} | "
                     f"{'yes' if r['event'] else 'no'} | {r['ms']:.3f} | {r['gbps']:.1f} | "
                     f"{100 * r['copy_fraction']:.0f}% | {r['vs_fused_adamw']:.2f}× |")
    lines += ["", "| τ selection | ms | vs kthvalue |", "| --- | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['ms']:.3f} | {r['speedup_vs_kthvalue']:.1f}× |"
              for r in result["selection"]]
    lines += ["", "| backend | host syncs in step() with a GradScaler |", "| --- | --- |"]
    lines += [f"| {r['backend']} | {r['syncs'] if r['syncs'] is not None else r['note']} |"
              for r in result["syncs"]]
    lines.append("")
    for graph in result["graph_replay"]:
        timing = (f", replay {graph['replay_ms']:.3f} ms vs eager step {graph['eager_ms']:.3f} "
                  f"ms (skipped steps)" if "replay_ms" in graph else "")
        lines.append(f"CUDA-graph replay of MGPP {graph['backend']} (capturable=True), "
                     f"{graph['steps']} step calls: captured {graph['captured']}, bit-identical "
                     f"to eager {graph['identical']}{timing}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU (triton through the interpreter, cpu for cuda)")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, backends = torch.device("cpu"), ["cpu", "triton"]
    elif torch.cuda.is_available():
        device, backends = torch.device("cuda"), ["cuda", "triton"]
    else:
        print("no CUDA device: run with --dry-run", file=sys.stderr)
        return 1
    missing = [b for b in backends if b not in mgpp_kernels.available_backends()]
    if missing:
        print(f"backends not available: {missing}", file=sys.stderr)
        return 1
    bandwidth = copy_bandwidth(5, 1 << (16 if args.dry_run else 28), device)
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                  torch=torch.__version__, triton=triton_version(), copy_gbps=bandwidth,
                  steps=step_rows(device, backends, args.dry_run, bandwidth),
                  selection=selection_rows(device, backends, args.dry_run),
                  syncs=sync_rows(device, backends),
                  graph_replay=[graph_replay(device, b, args.dry_run) for b in backends])
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "gpu_bench.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (output / "gpu_bench.md").write_text(table)
    print(table)
    differing = [g["backend"] for g in result["graph_replay"] if not g["identical"]]
    if differing:
        print(f"CUDA-graph replay differs from eager steps: {differing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
