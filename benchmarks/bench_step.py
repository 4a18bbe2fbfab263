"""One optimizer step of MGPP and of torch.optim.AdamW on a BERT-base-shaped model, side by side in
one process: `python benchmarks/bench_step.py`, or `python -m mgpp_kernels bench` in a checkout.

Every time is the median of several steps after a warm-up; the steps whose ratios are the targets
(fused AdamW and MGPP without and with an event, in each storage combination) take turns, one
step each per round, so that a slow spell of a shared machine falls on all of them. Effective
GB/s counts the bytes docs/spec.md §3 says a step must move (benchmarks/common/storage.py: θ, g,
m, v read and θ, m, v written once per element). The storage section times every storage
combination on the BERT-base tensor list and on one tensor of its candidates' size, beside
torch.optim.AdamW(fused=True) in the same parameter dtype, without and with a pruning event, each
on its own copy of the same parameters, with all threads and with one. Each is also given against
the bandwidth of a copy measured in the same run and against its roofline: the time its bytes need
at the fp32 MGPP step's measured bandwidth. The suite with every peer, scaling and plots is
benchmarks/suite.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys

# Run as a script, this folder is on sys.path, not the checkout: put the checkout first, so that
# the benchmark finds benchmarks.common and measures the mgpp_kernels beside it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from mgpp_kernels import MGPP, __version__  # noqa: E402
from mgpp_kernels.backends import available_backends, load_backend  # noqa: E402
from mgpp_kernels.workloads import bert_base, random_parameters  # noqa: E402

from benchmarks.common.machine import cpu_features, cpu_model  # noqa: E402
from benchmarks.common.memory import peak_rss_growth  # noqa: E402
from benchmarks.common.settings import (BETAS, EPS, EVENT_SCHEDULE, FINAL_SPARSITY,  # noqa: E402
                                        LR, NUM_TRAIN_EXAMPLES, PRUNED_SCHEDULE)
from benchmarks.common.storage import (BY_LABEL, FP32, STORAGE, Storage,  # noqa: E402
                                       adamw_counterpart)
from benchmarks.common.timing import (call_seconds, copy_bandwidth,  # noqa: E402
                                      interleaved_median_times, median_time, num_threads)

# The README's fine-tuning setting: no decoupled weight decay.
WEIGHT_DECAY = 0.0
MGPP_CPU = "MGPP cpu"
FUSED_ADAMW = "torch AdamW fused"


def parameters(candidate_shapes, other_shapes, dtype: torch.dtype
               ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The candidates and the other parameters, each with a gradient, the same values for every
    call with the same shapes."""
    generator = torch.Generator().manual_seed(0)
    return (random_parameters(candidate_shapes, generator, std=0.04, grad_std=1e-3, dtype=dtype),
            random_parameters(other_shapes, generator, std=0.04, grad_std=1e-3, dtype=dtype))


def bert_base_parameters(layers: int, dtype: torch.dtype = torch.float32):
    """BERT-base's candidate matrices and its other parameters (embeddings, LayerNorm, biases,
    pooler)."""
    shapes = bert_base(layers)
    return parameters(shapes.candidate_shapes(), shapes.other_shapes(), dtype)


def mgpp_optimizer(candidates, others, backend: str, schedule: dict, storage: Storage = FP32,
                   pattern: str = "unstructured"):
    """MGPP with the candidates as pruning candidates (one pool of `pattern`) and plain AdamW
    for the others."""
    return MGPP([{"params": candidates, "prune": True, "pattern": pattern},
                 {"params": others, "prune": False}],
                lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, backend=backend,
                state_dtype=storage.state_dtype, num_train_examples=NUM_TRAIN_EXAMPLES,
                **schedule)


def fused_adamw(params):
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                             fused=True)


def started_step(optimizer):
    """The optimizer's step, after a first step that prunes to s_i and allocates the state."""
    optimizer.step()
    return optimizer.step


def storage_rows(layers: int, repeats: int) -> list[dict]:
    """The storage section: a row per (layout, storage, threads, implementation, event)."""
    shapes = bert_base(layers)
    layouts = (("BERT-base lists", shapes.candidate_shapes(), shapes.other_shapes()),
               ("one tensor", [(shapes.candidate_elements,)], []))
    all_threads = torch.get_num_threads()
    thread_counts = [all_threads] + ([1] if all_threads > 1 else [])
    rows = []
    for threads in thread_counts:
        with num_threads(threads):
            bandwidth = copy_bandwidth(repeats)
        print(f"  copy bandwidth, {threads} thread(s): {bandwidth:.1f} GB/s", flush=True)
        for layout, candidate_shapes, other_shapes in layouts:
            for storage in STORAGE:
                elements = sum(math.prod(shape) for shape in candidate_shapes + other_shapes)
                step_bytes = storage.step_bytes() * elements

                def fresh_parameters():
                    return parameters(candidate_shapes, other_shapes, storage.param_dtype)

                # (implementation, event): its step, each on its own copy of the same parameters.
                steps = {}
                if storage.runs_on_adamw:
                    steps[FUSED_ADAMW, False] = fused_adamw(sum(fresh_parameters(), [])).step
                for schedule, event in ((PRUNED_SCHEDULE, False), (EVENT_SCHEDULE, True)):
                    steps[MGPP_CPU, event] = started_step(
                        mgpp_optimizer(*fresh_parameters(), "cpu", schedule, storage))
                with num_threads(threads):
                    seconds_of = interleaved_median_times(steps, repeats)
                for (implementation, event), step in steps.items():
                    seconds = seconds_of[implementation, event]
                    row = dict(section="storage", layout=layout, storage=storage.label,
                               threads=threads, implementation=implementation, event=event,
                               seconds=seconds, elements=elements, bytes=step_bytes,
                               gbps=step_bytes / seconds / 1e9, copy_gbps=bandwidth)
                    if implementation == MGPP_CPU:
                        with num_threads(threads):
                            row["peak_extra_bytes"] = peak_rss_growth(step)
                    rows.append(row)
                    print(f"  {layout:<16} {storage.label:<18} {threads:>2} thr  "
                          f"{implementation:<22} {'event' if event else '':<5} "
                          f"{seconds * 1e3:9.2f} ms {row['gbps']:6.1f} GB/s", flush=True)
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
        fp32 = find(r["layout"], FP32.label, r["threads"], MGPP_CPU, False)
        r["vs_roofline"] = r["seconds"] / (r["bytes"] / (fp32["gbps"] * 1e9))
        r["vs_copy_bandwidth"] = r["gbps"] / r["copy_gbps"]
        adamw_storage = adamw_counterpart(BY_LABEL[r["storage"]]).label
        adamw = find(r["layout"], adamw_storage, r["threads"], FUSED_ADAMW, False)
        r["vs_fused_adamw"] = r["seconds"] / adamw["seconds"]
        r["vs_fp32_mgpp"] = r["seconds"] / fp32["seconds"]
        no_event = find(r["layout"], r["storage"], r["threads"], MGPP_CPU, False)
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


def storage_targets(rows: list[dict]) -> dict:
    """The ratios the storage targets are about, on the BERT-base lists with all threads."""
    threads = max(r["threads"] for r in rows)
    by_key = {(r["storage"], r["implementation"], r["event"]): r for r in rows
              if r["layout"] == "BERT-base lists" and r["threads"] == threads}
    mgpp = {storage.label: by_key[(storage.label, MGPP_CPU, False)] for storage in STORAGE}
    return {
        "fp32_vs_fused_adamw": mgpp["fp32"]["vs_fused_adamw"],
        "bf16_bf16_vs_fp32": mgpp["bf16"]["vs_fp32_mgpp"],
        "fp16_fp16_vs_fp32": mgpp["fp16"]["vs_fp32_mgpp"],
        "bf16_fp32_vs_fp32": mgpp["bf16, fp32 state"]["vs_fp32_mgpp"],
        "bf16_vs_fused_adamw_bf16": mgpp["bf16"]["vs_fused_adamw"],
        "event_vs_no_event_fp32": by_key[("fp32", MGPP_CPU, True)]["vs_no_event"],
        "event_vs_no_event_bf16": by_key[("bf16", MGPP_CPU, True)]["vs_no_event"],
    }


# The regrowth regime: a first event prunes half the candidates; the optimizer timed then prunes
# to about 0.3 at every step (EVENT_SCHEDULE), so the weights each event prunes regrow to almost
# the same |θ| by the next step and τ falls in a high bin holding far more than 1/128 of the
# candidates.
REGROWTH_FIRST_EVENT = dict(EVENT_SCHEDULE, initial_sparsity=0.5, final_sparsity=FINAL_SPARSITY)


def copy_optimizer_state(source, target) -> None:
    """The parameters and the optimizer state of `source` copied into `target`'s own tensors
    (the same shapes, param for param)."""
    with torch.no_grad():
        for source_group, target_group in zip(source.param_groups, target.param_groups):
            for p, q in zip(source_group["params"], target_group["params"]):
                q.copy_(p)
                for key, value in source.state[p].items():
                    if torch.is_tensor(value) and key in target.state[q]:
                        target.state[q][key].copy_(value)


def regrowth_rows(layers: int, repeats: int) -> list[dict]:
    """Events on consecutive steps after an event against a plain step, BERT-base lists, fp32 and
    bf16 + bf16 state, all threads and one. Fair: before each round the plain optimizer
    (PRUNED_SCHEDULE, no event) gets a copy of the event optimizer's parameters and state, so
    the two steps update the same weights (as many take the spike path in both) on their own
    copies; then the plain step and the event step are timed, one each per round."""
    all_threads = torch.get_num_threads()
    rows = []
    for threads in [all_threads] + ([1] if all_threads > 1 else []):
        for storage in (FP32, BY_LABEL["bf16"]):
            candidates, others = bert_base_parameters(layers, storage.param_dtype)
            mgpp_optimizer(candidates, others, "cpu", REGROWTH_FIRST_EVENT, storage).step()
            events = mgpp_optimizer(candidates, others, "cpu", EVENT_SCHEDULE, storage)
            plain = mgpp_optimizer(*bert_base_parameters(layers, storage.param_dtype), "cpu",
                                   PRUNED_SCHEDULE, storage)
            times = {False: [], True: []}
            with num_threads(threads):
                events.step()
                plain.step()
                for round_ in range(repeats + 1):   # the first round warms up
                    copy_optimizer_state(events, plain)
                    for event, optimizer in ((False, plain), (True, events)):
                        seconds = call_seconds(optimizer.step)
                        if round_:
                            times[event].append(seconds)
            seconds = {event: statistics.median(values) for event, values in times.items()}
            row = dict(section="regrowth", storage=storage.label, threads=threads,
                       plain_seconds=seconds[False], event_seconds=seconds[True],
                       vs_no_event=seconds[True] / seconds[False])
            rows.append(row)
            print(f"  regrowth {storage.label:<6} {threads:>2} thr  plain {seconds[False] * 1e3:8.2f} ms"
                  f"  events every step {seconds[True] * 1e3:8.2f} ms  {row['vs_no_event']:.2f}x",
                  flush=True)
            del events, plain
    return rows


# The N:M pattern the pattern section compares with unstructured candidates.
PATTERN = "2:4"


def pattern_rows(layers: int, repeats: int) -> tuple[list[dict], dict]:
    """The pattern section: the cpu step over the candidates as one unstructured pool and as one
    2:4 pool, without and with a pruning event, all threads, taking turns; and the 2:4 steps'
    ratios to the unstructured ones."""
    steps = {}
    for pattern in ("unstructured", PATTERN):
        for schedule, event in ((PRUNED_SCHEDULE, False), (EVENT_SCHEDULE, True)):
            steps[pattern, event] = started_step(mgpp_optimizer(
                *bert_base_parameters(layers), "cpu", schedule, pattern=pattern))
    seconds_of = interleaved_median_times(steps, repeats)
    rows = []
    for (pattern, event), seconds in seconds_of.items():
        rows.append(dict(section="pattern", pattern=pattern, event=event, seconds=seconds,
                         threads=torch.get_num_threads()))
        print(f"  {pattern:<14} {'event' if event else '':<5} {seconds * 1e3:9.2f} ms",
              flush=True)
    ratios = {f"{PATTERN}_vs_unstructured": seconds_of[PATTERN, False]
              / seconds_of["unstructured", False],
              f"{PATTERN}_vs_unstructured_event": seconds_of[PATTERN, True]
              / seconds_of["unstructured", True]}
    print("  " + ", ".join(f"{name} {value:.3f}x" for name, value in ratios.items()), flush=True)
    return rows, ratios


def run(quick: bool = False, repeats: int = 5, output: str = "bench_results.json",
        regrowth_only: bool = False, patterns_only: bool = False) -> dict:
    layers = 2 if quick else 12
    if patterns_only:
        print(f"patterns (cpu), BERT-base shape, {layers} layers, cpu {cpu_model()}:")
        rows, ratios = pattern_rows(layers, repeats)
        result = dict(cpu=cpu_model(), layers=layers, pattern_rows=rows, summary=ratios,
                      load_average=os.getloadavg())
        with open(output, "w") as f:
            json.dump(result, f, indent=2)
        return result
    if regrowth_only:
        print(f"regrowth regime (cpu), BERT-base shape, {layers} layers, cpu {cpu_model()}:")
        regrowth = regrowth_rows(layers, repeats)
        result = dict(cpu=cpu_model(), layers=layers, regrowth_rows=regrowth,
                      load_average=os.getloadavg())
        with open(output, "w") as f:
            json.dump(result, f, indent=2)
        return result
    candidates, others = bert_base_parameters(layers)
    params = candidates + others
    numel = sum(p.numel() for p in params)
    candidate_numel = sum(p.numel() for p in candidates)
    step_bytes = FP32.step_bytes() * numel
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
        adamw = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                  **options)
        label = "torch AdamW " + (next(iter(options)) + "=True" if options else "default")
        record_step(label, adamw.step, repeats)
        del adamw

    built = [b for b in available_backends() if b in ("cpu", "reference")]
    # Fused AdamW and the cpu backend's steps, whose ratios are the targets, take turns, each on
    # its own copy of the same parameters.
    side_by_side = {"torch AdamW fused=True": fused_adamw(sum(bert_base_parameters(layers), []))
                    .step}
    if "cpu" in built:
        for name, schedule in (("without event", PRUNED_SCHEDULE),
                               ("with pruning event", EVENT_SCHEDULE)):
            side_by_side[f"MGPP cpu step {name}"] = started_step(
                mgpp_optimizer(*bert_base_parameters(layers), "cpu", schedule))
    for name, seconds in interleaved_median_times(side_by_side, repeats).items():
        record_step_time(name, seconds, side_by_side[name])
    del side_by_side
    by_name = {r["name"]: r["seconds"] for r in rows}
    fused_adamw_seconds = by_name["torch AdamW fused=True"]
    mgpp_steps = {"cpu": by_name["MGPP cpu step without event"]} if "cpu" in built else {}
    if "reference" in built:
        record_step("MGPP reference step without event",
                    started_step(mgpp_optimizer(candidates, others, "reference", PRUNED_SCHEDULE)),
                    1 if quick else repeats)
        mgpp_steps["reference"] = rows[-1]["seconds"]

    if "cpu" in built:
        cpu = load_backend("cpu")
        k = int(candidate_numel * 0.9)

        def kthvalue():
            return torch.kthvalue(torch.cat([p.detach().abs().flatten() for p in candidates]),
                                  k).values

        ours = median_time(lambda: cpu.global_threshold(candidates, k), repeats)
        record("tau selection, radix histograms (cpu)", ours, 4 * candidate_numel)
        torch_time = median_time(kthvalue, 3 if not quick else repeats)
        record("tau selection, torch.cat + torch.kthvalue", torch_time, 4 * candidate_numel)
        if not torch.equal(cpu.global_threshold(candidates, k), kthvalue()):
            raise RuntimeError("radix selection and kthvalue disagree on tau")

        del candidates, others, params

    summary = {
        "no_event_vs_fused_adamw": mgpp_steps.get("cpu", float("nan")) / fused_adamw_seconds,
    }
    if "cpu" in mgpp_steps:
        by_name = {r["name"]: r["seconds"] for r in rows}
        summary.update(
            reference_vs_cpu=by_name["MGPP reference step without event"] / mgpp_steps["cpu"],
            event_vs_no_event=by_name["MGPP cpu step with pruning event"] / mgpp_steps["cpu"],
            kthvalue_vs_radix=by_name["tau selection, torch.cat + torch.kthvalue"]
            / by_name["tau selection, radix histograms (cpu)"])
    for row in rows:
        row["vs_fused_adamw"] = row["seconds"] / fused_adamw_seconds
    storage = []
    if "cpu" in built:
        print("storage combinations (cpu):")
        storage = storage_rows(layers, repeats)
        summary.update(storage_targets(storage))
        print("regrowth regime (cpu): events on consecutive steps after an event:")
        regrowth = regrowth_rows(layers, repeats)
        for row in regrowth:
            if row["threads"] == torch.get_num_threads():
                key = "fp32" if row["storage"] == FP32.label else "bf16"
                summary[f"regrowth_events_vs_no_event_{key}"] = row["vs_no_event"]
        print(f"patterns (cpu): {PATTERN} candidates against unstructured ones:")
        pattern, pattern_ratios = pattern_rows(layers, repeats)
        summary.update(pattern_ratios)
    print()
    print(format_table(rows))
    if storage:
        print()
        print(format_storage_table(storage))
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.2f}x")
    result = dict(machine=platform.processor() or platform.machine(), cpu=cpu_model(),
                  cpu_features=cpu_features(), threads=torch.get_num_threads(),
                  torch=torch.__version__, mgpp_kernels=__version__, layers=layers,
                  elements=numel, candidate_elements=candidate_numel, rows=rows,
                  storage_rows=storage, regrowth_rows=regrowth if storage else [],
                  pattern_rows=pattern if storage else [],
                  summary=summary, load_average=os.getloadavg())
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {output}")
    return result


def format_table(rows: list[dict]) -> str:
    """Markdown: time, ratio to fused AdamW, effective GB/s, and peak memory growth of a step
    ("unknown" where this system cannot measure it)."""
    lines = [f"| {'step':<48} | {'ms':>9} | {'vs fused AdamW':>14} | {'GB/s':>6} | {'peak +MiB':>9} |",
             f"|{'-' * 50}|{'-' * 11}|{'-' * 16}|{'-' * 8}|{'-' * 11}|"]
    for r in rows:
        if "peak_extra_bytes" not in r:
            peak = ""
        elif r["peak_extra_bytes"] is None:
            peak = "unknown"
        else:
            peak = f"{r['peak_extra_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['name']:<48} | {r['seconds'] * 1e3:9.2f} | {r['vs_fused_adamw']:13.2f}x "
                     f"| {r['gbps']:6.1f} | {peak:>9} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_step.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 12")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--output", default="bench_results.json", help="JSON file of the results")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--regrowth-only", action="store_true",
                      help="only the regrowth regime: events on consecutive steps after an event")
    only.add_argument("--patterns-only", action="store_true",
                      help=f"only the cpu step over {PATTERN} candidates against unstructured ones")
    args = parser.parse_args(argv)
    run(quick=args.quick, repeats=args.repeats, output=args.output,
        regrowth_only=args.regrowth_only, patterns_only=args.patterns_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
