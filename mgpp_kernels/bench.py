"""`python -m mgpp_kernels bench` (also benchmarks/bench_step.py): one optimizer step of MGPP and of
torch.optim.AdamW on a BERT-base-shaped model, side by side in one process.

Every time is the median of several steps after a warm-up; the steps whose ratios are the bars
(fused AdamW and MGPP without and with an event, in each storage combination) take turns, one
step each per round, so that a slow spell of a shared machine falls on all of them. Effective
GB/s counts the bytes docs/spec.md §3 says a step must move: θ, g, m, v read and θ, m, v written
once per element (3 × the parameter's bytes + 4 × the state's). The storage section times every
storage combination (fp32; bf16 + bf16 state; bf16 + fp32 state; fp16 + fp16 state) on the
BERT-base tensor list and on one tensor of its candidates' size, beside
torch.optim.AdamW(fused=True) in the same parameter dtype, without and with a pruning event, each
on its own copy of the same parameters, with all threads and with one. Each is
also given against the bandwidth of a copy measured in the same run and against its roofline: the
time its bytes need at the fp32 MGPP step's measured bandwidth. The benchmark suite with every
peer, scaling and plots is benchmarks/suite.py in the repository.
"""
from __future__ import annotations

import argparse
import json
import math
import os
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


def interleaved_median_times(steps: dict, repeats: int, warmup: int = 1) -> dict:
    """The median time of each of `steps` (name: callable), the steps taking turns, one call each
    per round: a slow spell of a shared machine then falls on all of them alike, and their ratios
    hold where back-to-back blocks of repeats swing with it."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


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


def started_step(optimizer):
    """The optimizer's step, after a first step that prunes to s_i and allocates the state."""
    optimizer.step()
    return optimizer.step


# (label, parameter dtype, MGPP's state_dtype) of each storage combination.
STORAGE = (("fp32", torch.float32, torch.float32),
           ("bf16 + bf16 state", torch.bfloat16, "param"),
           ("bf16 + fp32 state", torch.bfloat16, torch.float32),
           ("fp16 + fp16 state", torch.float16, "param"))


def bytes_per_element(param_dtype: torch.dtype, state_dtype) -> int:
    """θ read and written, g read; m and v read and written."""
    param_bytes = torch.finfo(param_dtype).bits // 8
    state_bytes = param_bytes if state_dtype == "param" else torch.finfo(state_dtype).bits // 8
    return 3 * param_bytes + 4 * state_bytes


def copy_bandwidth(repeats: int, elements: int = 1 << 26) -> float:
    """GB/s of `a.copy_(b)` on float32 arrays far larger than the caches, counting 12 B per
    element (b read, a read for ownership and written)."""
    source = torch.ones(elements)
    target = torch.empty(elements)
    seconds = median_time(lambda: target.copy_(source), repeats)
    return 12 * elements / seconds / 1e9


def with_threads(threads: int, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def storage_rows(layers: int, repeats: int) -> list[dict]:
    """The storage section: a row per (layout, storage, threads, implementation, event)."""
    shapes = bert_base(layers)
    candidate_numel = sum(math.prod(s) for s in shapes.candidate_shapes())
    layouts = (("BERT-base lists", shapes.candidate_shapes(), shapes.other_shapes()),
               ("one tensor", [(candidate_numel,)], []))
    all_threads = torch.get_num_threads()
    thread_counts = [all_threads] + ([1] if all_threads > 1 else [])
    rows = []
    for threads in thread_counts:
        bandwidth = with_threads(threads, lambda: copy_bandwidth(repeats))
        print(f"  copy bandwidth, {threads} thread(s): {bandwidth:.1f} GB/s", flush=True)
        for layout, candidate_shapes, other_shapes in layouts:
            for label, param_dtype, state_dtype in STORAGE:
                def parameters():
                    generator = torch.Generator().manual_seed(0)
                    return (random_parameters(candidate_shapes, generator, std=0.04,
                                              grad_std=1e-3, dtype=param_dtype),
                            random_parameters(other_shapes, generator, std=0.04, grad_std=1e-3,
                                              dtype=param_dtype))

                elements = sum(math.prod(shape) for shape in candidate_shapes + other_shapes)
                step_bytes = bytes_per_element(param_dtype, state_dtype) * elements
                # (implementation, event): its step, each on its own copy of the same parameters.
                steps = {}
                if label != "bf16 + fp32 state":   # AdamW keeps its state in the parameter dtype
                    steps["torch AdamW fused", False] = torch.optim.AdamW(
                        sum(parameters(), []), lr=1e-5, weight_decay=0.0, fused=True).step
                for interval, event in ((NO_EVENTS, False), (EVERY_STEP, True)):
                    steps["MGPP cpu", event] = started_step(
                        mgpp_optimizer(*parameters(), "cpu", interval, state_dtype))
                seconds_of = with_threads(threads,
                                          lambda: interleaved_median_times(steps, repeats))
                for (implementation, event), step in steps.items():
                    seconds = seconds_of[implementation, event]
                    row = dict(section="storage", layout=layout, storage=label, threads=threads,
                               implementation=implementation, event=event, seconds=seconds,
                               elements=elements, bytes=step_bytes,
                               gbps=step_bytes / seconds / 1e9, copy_gbps=bandwidth)
                    if implementation.startswith("MGPP"):
                        row["peak_extra_bytes"] = with_threads(threads,
                                                               lambda: peak_rss_growth(step))
                    rows.append(row)
                    print(f"  {layout:<16} {label:<18} {threads:>2} thr  {implementation:<22}"
                          f" {'event' if event else '':<5} {seconds * 1e3:9.2f} ms"
                          f" {row['gbps']:6.1f} GB/s", flush=True)
                del steps
    add_storage_ratios(rows)
    return rows


def add_storage_ratios(rows: list[dict]) -> None:
    """Each row against fused AdamW of the same parameter dtype and against its roofline (its
    bytes at the bandwidth of the fp32 MGPP step without an event, same layout and threads)."""
    def find(layout, storage, threads, implementation, event):
        for r in rows:
            if (r["layout"], r["storage"], r["threads"], r["implementation"], r["event"]) == (
                    layout, storage, threads, implementation, event):
                return r
        return None

    for r in rows:
        fp32 = find(r["layout"], "fp32", r["threads"], "MGPP cpu", False)
        r["vs_roofline"] = r["seconds"] / (r["bytes"] / (fp32["gbps"] * 1e9))
        r["vs_copy_bandwidth"] = r["gbps"] / r["copy_gbps"]
        adamw_storage = {"bf16 + fp32 state": "bf16 + bf16 state"}.get(r["storage"], r["storage"])
        adamw = find(r["layout"], adamw_storage, r["threads"], "torch AdamW fused", False)
        r["vs_fused_adamw"] = r["seconds"] / adamw["seconds"]
        r["vs_fp32_mgpp"] = r["seconds"] / fp32["seconds"]
        no_event = find(r["layout"], r["storage"], r["threads"], "MGPP cpu", False)
        r["vs_no_event"] = r["seconds"] / no_event["seconds"]


def format_storage_table(rows: list[dict]) -> str:
    """Markdown: the storage section, with its ratios."""
    lines = ["| layout | storage | threads | step | ms | GB/s | of copy GB/s | vs roofline "
             "| vs fused AdamW | vs fp32 MGPP | vs no event |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        step = r["implementation"] + (" + event" if r["event"] else "")
        lines.append(f"| {r['layout']} | {r['storage']} | {r['threads']} | {step} "
                     f"| {r['seconds'] * 1e3:.2f} | {r['gbps']:.1f} | {r['vs_copy_bandwidth']:.0%} "
                     f"| {r['vs_roofline']:.2f}x | {r['vs_fused_adamw']:.2f}x "
                     f"| {r['vs_fp32_mgpp']:.2f}x | {r['vs_no_event']:.2f}x |")
    return "\n".join(lines)


def storage_bars(rows: list[dict]) -> dict:
    """The issue's bars on the BERT-base lists with all threads, as ratios."""
    threads = max(r["threads"] for r in rows)
    by_key = {(r["storage"], r["implementation"], r["event"]): r for r in rows
              if r["layout"] == "BERT-base lists" and r["threads"] == threads}
    mgpp = {storage: by_key[(storage, "MGPP cpu", False)] for storage, _, _ in STORAGE}
    return {
        "fp32_vs_fused_adamw": mgpp["fp32"]["vs_fused_adamw"],
        "bf16_bf16_vs_fp32": mgpp["bf16 + bf16 state"]["vs_fp32_mgpp"],
        "fp16_fp16_vs_fp32": mgpp["fp16 + fp16 state"]["vs_fp32_mgpp"],
        "bf16_fp32_vs_fp32": mgpp["bf16 + fp32 state"]["vs_fp32_mgpp"],
        "bf16_vs_fused_adamw_bf16": mgpp["bf16 + bf16 state"]["vs_fused_adamw"],
        "event_vs_no_event_fp32": by_key[("fp32", "MGPP cpu", True)]["vs_no_event"],
        "event_vs_no_event_bf16": by_key[("bf16 + bf16 state", "MGPP cpu", True)]["vs_no_event"],
    }


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

    def record_step_time(name, seconds, step):
        """Records a step's time, then how much the peak RSS grows during one more step."""
        record(name, seconds)
        rows[-1]["peak_extra_bytes"] = peak_rss_growth(step)

    def record_step(name, step, repeats):
        record_step_time(name, median_time(step, repeats), step)

    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"BERT-base shape, {layers} layers: {candidate_numel:,} candidate + "
          f"{numel - candidate_numel:,} other elements, fp32, {torch.get_num_threads()} threads")
    for options in ({}, {"foreach": True}):
        adamw = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **options)
        label = "torch AdamW " + (next(iter(options)) + "=True" if options else "default")
        record_step(label, adamw.step, repeats)
        del adamw

    built = [b for b in available_backends() if b in ("cpu", "reference")]
    # Fused AdamW and the cpu backend's steps, whose ratios are the bars, take turns, each on its
    # own copy of the same parameters.
    side_by_side = {"torch AdamW fused=True": torch.optim.AdamW(
        sum(bert_base_parameters(layers, torch.float32), []), lr=1e-5, weight_decay=0.0,
        fused=True).step}
    if "cpu" in built:
        for name, interval in (("without event", NO_EVENTS), ("with pruning event", EVERY_STEP)):
            side_by_side[f"MGPP cpu step {name}"] = started_step(
                mgpp_optimizer(*bert_base_parameters(layers, torch.float32), "cpu", interval))
    for name, seconds in interleaved_median_times(side_by_side, repeats).items():
        record_step_time(name, seconds, side_by_side[name])
    del side_by_side
    by_name = {r["name"]: r["seconds"] for r in rows}
    fused_adamw = by_name["torch AdamW fused=True"]
    mgpp_steps = {"cpu": by_name["MGPP cpu step without event"]} if "cpu" in built else {}
    if "reference" in built:
        record_step("MGPP reference step without event",
                    started_step(mgpp_optimizer(candidates, others, "reference", NO_EVENTS)),
                    1 if quick else repeats)
        mgpp_steps["reference"] = rows[-1]["seconds"]

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

    summary = {
        "no_event_vs_fused_adamw": mgpp_steps.get("cpu", float("nan")) / fused_adamw,
    }
    if "cpu" in mgpp_steps:
        by_name = {r["name"]: r["seconds"] for r in rows}
        summary.update(
            reference_vs_cpu=by_name["MGPP reference step without event"] / mgpp_steps["cpu"],
            event_vs_no_event=by_name["MGPP cpu step with pruning event"] / mgpp_steps["cpu"],
            kthvalue_vs_radix=by_name["tau selection, torch.cat + torch.kthvalue"]
            / by_name["tau selection, radix histograms (cpu)"])
    for row in rows:
        row["vs_fused_adamw"] = row["seconds"] / fused_adamw
    storage = []
    if "cpu" in built:
        print("storage combinations (cpu):")
        storage = storage_rows(layers, repeats)
        summary.update(storage_bars(storage))
    print()
    print(format_table(rows))
    if storage:
        print()
        print(format_storage_table(storage))
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.2f}x")
    result = dict(machine=platform.processor() or platform.machine(), cpu=cpu_model(),
                  threads=torch.get_num_threads(), torch=torch.__version__, mgpp_kernels=__version__,
                  layers=layers, elements=numel, candidate_elements=candidate_numel, rows=rows,
                  storage_rows=storage, summary=summary, load_average=os.getloadavg())
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
