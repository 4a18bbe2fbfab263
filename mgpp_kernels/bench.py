"""`python -m mgpp_kernels bench` (also benchmarks/bench_step.py): one optimizer step of MGPP and of
torch.optim.AdamW on a BERT-base-shaped model, side by side in one process.

Every time is the median of several steps after a warm-up. Effective GB/s counts the bytes
docs/spec.md §3 says a step must move: θ, g, m, v read and θ, m, v written once per element. The
benchmark suite with every peer, scaling and plots is benchmarks/suite.py in the repository.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from . import __version__
from .backends import available_backends, load_backend
from .optimizer import MGPP
from .workloads import bert_base, random_parameters


def bert_base_parameters(layers: int, dtype: torch.dtype, seed: int = 0
                         ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """BERT-base's candidate matrices and its other parameters (embeddings, LayerNorm, biases,
    pooler), each with a gradient."""
    shapes = bert_base(layers)
    generator = torch.Generator().manual_seed(seed)
    candidates = random_parameters(shapes.candidate_shapes(), generator, std=0.04, grad_std=1e-3,
                                   dtype=dtype)
    others = random_parameters(shapes.other_shapes(), generator, std=0.04, grad_std=1e-3,
                               dtype=dtype)
    return candidates, others


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_growth(fn) -> int:
    """Bytes by which the process's peak resident set grows during fn() (Linux)."""
    def read(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return -1
    before = read("VmRSS:")
    fn()
    return read("VmHWM:") - before


def mgpp_optimizer(candidates, others, backend, pruning_interval, state_dtype=torch.float32):
    """MGPP in its pruning stage from step 0: an event every `pruning_interval` steps."""
    return MGPP([{"params": candidates, "prune": True}, {"params": others, "prune": False}],
                lr=1e-5, weight_decay=0.0, backend=backend, state_dtype=state_dtype,
                total_steps=1_000_000, initial_warmup_steps=0, pruning_interval=pruning_interval,
                num_train_examples=67349)


NO_EVENTS, EVERY_STEP = 1_000_000, 1


def run(quick: bool = False, repeats: int = 5, output: str = "bench_results.json") -> dict:
    layers = 2 if quick else 12
    torch.manual_seed(0)
    candidates, others = bert_base_parameters(layers, torch.float32)
    params = candidates + others
    numel = sum(p.numel() for p in params)
    candidate_numel = sum(p.numel() for p in candidates)
    step_bytes = 28 * numel  # fp32: θ, g, m, v in, θ, m, v out
    rows: list[dict] = []

    def record(name, seconds, bytes_moved=step_bytes):
        rows.append(dict(name=name, seconds=seconds, gbps=bytes_moved / seconds / 1e9))
        print(f"  {name:<48} {seconds * 1e3:10.2f} ms", flush=True)

    def record_step(name, step, repeats, bytes_moved=step_bytes):
        """Times `step`, then records how much the peak RSS grows during one more step."""
        record(name, median_time(step, repeats), bytes_moved)
        rows[-1]["peak_extra_bytes"] = peak_rss_growth(step)

    print(f"BERT-base shape, {layers} layers: {candidate_numel:,} candidate + "
          f"{numel - candidate_numel:,} other elements, fp32, {torch.get_num_threads()} threads")
    for options in ({}, {"foreach": True}, {"fused": True}):
        adamw = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **options)
        label = "torch AdamW " + (next(iter(options)) + "=True" if options else "default")
        record_step(label, adamw.step, repeats)
        del adamw
    fused_adamw = rows[-1]["seconds"]

    built = [b for b in available_backends() if b in ("cpu", "reference")]
    mgpp_steps = {}
    for backend in built:
        optimizer = mgpp_optimizer(candidates, others, backend, NO_EVENTS)
        optimizer.step()  # the first step prunes to s_i and allocates the state
        record_step(f"MGPP {backend} step without event", optimizer.step,
                    1 if backend == "reference" and quick else repeats)
        mgpp_steps[backend] = rows[-1]["seconds"]
        del optimizer
        if backend != "reference":
            optimizer = mgpp_optimizer(candidates, others, backend, EVERY_STEP)
            record_step(f"MGPP {backend} step with pruning event", optimizer.step, repeats)
            del optimizer

    if "cpu" in built:
        cpu = load_backend("cpu")
        k = int(candidate_numel * 0.9)
        ours = median_time(lambda: cpu.global_threshold(candidates, k), repeats)
        record("tau selection, radix histograms (cpu)", ours, 4 * candidate_numel)
        torch_time = median_time(
            lambda: torch.kthvalue(torch.cat([p.detach().abs().flatten() for p in candidates]), k),
            3 if not quick else repeats)
        record("tau selection, torch.cat + torch.kthvalue", torch_time, 4 * candidate_numel)
        same = torch.equal(cpu.global_threshold(candidates, k),
                           torch.kthvalue(torch.cat([p.detach().abs().flatten() for p in candidates]), k).values)
        assert same, "radix selection and kthvalue disagree on tau"

        del candidates, others, params
        bf16_candidates, bf16_others = bert_base_parameters(layers, torch.bfloat16)
        optimizer = mgpp_optimizer(bf16_candidates, bf16_others, "cpu", NO_EVENTS, state_dtype="param")
        optimizer.step()
        record_step("MGPP cpu step without event, bf16 + bf16 state", optimizer.step, repeats,
                    step_bytes // 2)

    summary = {
        "no_event_vs_fused_adamw": mgpp_steps.get("cpu", float("nan")) / fused_adamw,
    }
    if "cpu" in mgpp_steps:
        by_name = {r["name"]: r["seconds"] for r in rows}
        summary.update(
            reference_vs_cpu=by_name["MGPP reference step without event"] / mgpp_steps["cpu"],
            event_vs_no_event=by_name["MGPP cpu step with pruning event"] / mgpp_steps["cpu"],
            kthvalue_vs_radix=by_name["tau selection, torch.cat + torch.kthvalue"]
            / by_name["tau selection, radix histograms (cpu)"],
            bf16_vs_fp32=by_name["MGPP cpu step without event, bf16 + bf16 state"] / mgpp_steps["cpu"])
    for row in rows:
        row["vs_fused_adamw"] = row["seconds"] / fused_adamw
    print()
    print(format_table(rows))
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.2f}x")
    result = dict(machine=platform.processor() or platform.machine(), cpu=cpu_model(),
                  threads=torch.get_num_threads(), torch=torch.__version__, mgpp_kernels=__version__,
                  layers=layers, elements=numel, candidate_elements=candidate_numel, rows=rows,
                  summary=summary)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {output}")
    return result


def format_table(rows: list[dict]) -> str:
    """Markdown: time, ratio to fused AdamW, effective GB/s, and peak memory growth of a step."""
    lines = [f"| {'step':<48} | {'ms':>9} | {'vs fused AdamW':>14} | {'GB/s':>6} | {'peak +MiB':>9} |",
             f"|{'-' * 50}|{'-' * 11}|{'-' * 16}|{'-' * 8}|{'-' * 11}|"]
    for r in rows:
        peak = f"{r['peak_extra_bytes'] / 2**20:9.1f}" if "peak_extra_bytes" in r else f"{'':>9}"
        lines.append(f"| {r['name']:<48} | {r['seconds'] * 1e3:9.2f} | {r['vs_fused_adamw']:13.2f}x "
                     f"| {r['gbps']:6.1f} | {peak} |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mgpp_kernels bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 12")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--output", default="bench_results.json", help="JSON file of the results")
    args = parser.parse_args(argv)
    run(quick=args.quick, repeats=args.repeats, output=args.output)
    return 0
