"""The suite's report: the targets, markdown tables, README.md and the terminal summary."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .peers import COMPILED_REFERENCE, FUSED_ADAMW, RECIPE, SELECTION_METHODS
from .plots import write_plots
from .results import machine_slug, roofline_gbps, series_label, write_csv
from .storage import FP32, STORAGE


@dataclass
class Target:
    text: str
    value: str
    met: bool


def evaluate_targets(rows: list[dict], peers_model: str) -> list[Target]:
    """The targets for every kernel backend in the run (the cpu backend on a CPU), judged on
    median times; the value from each measurement's best call follows in brackets."""
    bandwidth = roofline_gbps(rows)
    steps = [r for r in rows if r["section"] == "step"]
    all_threads = max((r["threads"] for r in steps if r["threads"] != ""), default="")
    main = [r for r in steps if r["threads"] == all_threads]

    def find(implementation, model, precision=FP32.label, event=False):
        for r in main:
            if (r["implementation"], r["model"], r["precision"], r["event"]) == (
                    implementation, model, precision, event):
                return r
        return None

    kernels = sorted({r["implementation"] for r in main if r["implementation"].startswith("MGPP")
                      and r["implementation"] != "MGPP reference"})
    largest = max((r for r in main if r["implementation"] == FUSED_ADAMW),
                  key=lambda r: r["elements"], default=None)
    targets = []
    for kernel in kernels:
        for model in dict.fromkeys(m for m in (peers_model, largest and largest["model"]) if m):
            row = find(kernel, model)
            if row is None:
                continue
            size = _millions(row["elements"])
            best_fraction = row["bytes_per_element"] * row["elements"] / row["best_seconds"] / 1e9 \
                / bandwidth
            targets.append(Target(
                f"{kernel} fp32 no-event at {size} ({model}): >= 80% of bandwidth",
                f"{row['fraction_of_bandwidth']:.0%} ({best_fraction:.0%})",
                row["fraction_of_bandwidth"] >= 0.8))
            fused = find(FUSED_ADAMW, model)
            targets.append(Target(
                f"{kernel} fp32 no-event at {size}: <= 1.15x {FUSED_ADAMW}",
                f"{row['vs_fused_adamw']:.2f}x "
                f"({row['best_seconds'] / fused['best_seconds']:.2f}x)",
                row["vs_fused_adamw"] <= 1.15))
        ours = find(kernel, peers_model)
        for peer in (RECIPE, COMPILED_REFERENCE):
            theirs = find(peer, peers_model)
            if ours is not None and theirs is not None:
                ratio = theirs["seconds"] / ours["seconds"]
                best_ratio = theirs["best_seconds"] / ours["best_seconds"]
                targets.append(Target(f"{peer} >= 2x slower than {kernel} (fp32 no-event, "
                                      f"{peers_model})", f"{ratio:.1f}x ({best_ratio:.1f}x)",
                                      ratio >= 2))
        scaled = [r for r in main if r["implementation"] == kernel and r["precision"] == FP32.label
                  and not r["event"] and r["elements"] >= 10_000_000]
        if len(scaled) >= 2:
            spread = _spread([r["seconds"] / r["elements"] for r in scaled])
            best_spread = _spread([r["best_seconds"] / r["elements"] for r in scaled])
            targets.append(Target(f"{kernel} fp32 no-event time per element varies < 25% from "
                                  f"10M to {_millions(largest['elements'])}",
                                  f"{spread:.0%} ({best_spread:.0%})", spread < 0.25))
    return targets


def _spread(values: list[float]) -> float:
    return max(values) / min(values) - 1


def markdown_tables(rows: list[dict], peers_model: str) -> dict[str, str]:
    steps = [r for r in rows if r["section"] == "step"]
    all_threads = max((r["threads"] for r in steps if r["threads"] != ""), default="")
    peers = [r for r in steps if r["model"] == peers_model and r["threads"] == all_threads]
    lines = ["| implementation | precision | event | ms (best) | ns/element | vs fused AdamW "
             "| GB/s | % of bandwidth | peak extra MiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in peers:
        lines.append(f"| {r['implementation']} | {r['precision']} | {'yes' if r['event'] else 'no'} "
                     f"| {r['seconds'] * 1e3:.1f} ({r['best_seconds'] * 1e3:.1f}) "
                     f"| {r['ns_per_element']:.2f} "
                     f"| {_fmt(r['vs_fused_adamw'], '.2f', 'x')} | {r['gbps']:.1f} "
                     f"| {r['fraction_of_bandwidth'] * 100:.0f}% | {_fmt(r['peak_extra_mib'], '.1f')} |")
    tables = {"peers": "\n".join(lines)}

    models = list(dict.fromkeys(r["model"] for r in steps))
    sizes = {r["model"]: r["elements"] for r in steps}
    scaled = list(dict.fromkeys(
        (r["implementation"], r["precision"], r["event"], r["threads"]) for r in steps
        if sum(1 for s in steps if (s["implementation"], s["precision"], s["event"], s["threads"])
               == (r["implementation"], r["precision"], r["event"], r["threads"])) == len(models)))
    header = "| implementation | " + " | ".join(f"{m} ({sizes[m] / 1e6:.1f}M)" for m in models) + " |"
    lines = ["ns per element (% of bandwidth):", "", header, "|---|" + "---:|" * len(models)]
    for key in scaled:
        implementation, precision, event, threads = key
        cells = []
        for m in models:
            r = next(s for s in steps if s["model"] == m and (
                s["implementation"], s["precision"], s["event"], s["threads"]) == key)
            cells.append(f"{r['ns_per_element']:.2f} ({r['fraction_of_bandwidth'] * 100:.0f}%)")
        label = series_label(implementation, precision, event, threads)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tables["scaling"] = "\n".join(lines)

    selection = [r for r in rows if r["section"] == "selection"]
    models = list(dict.fromkeys(r["model"] for r in selection))
    sizes = {r["model"]: r["elements"] for r in selection}
    lines = ["ms (speed-up of radix over it):", "",
             "| method | " + " | ".join(f"{m} ({sizes[m] / 1e6:.1f}M)" for m in models) + " |",
             "|---|" + "---:|" * len(models)]
    for method in SELECTION_METHODS:
        cells = []
        for m in models:
            r = next(s for s in selection if s["model"] == m and s["implementation"] == method)
            radix = next(s for s in selection if s["model"] == m
                         and s["implementation"] == "radix histograms")
            if r["seconds"] == "":
                cells.append("skipped")
            elif method == "radix histograms":
                cells.append(f"{r['seconds'] * 1e3:.1f}")
            else:
                cells.append(f"{r['seconds'] * 1e3:.1f} ({r['seconds'] / radix['seconds']:.0f}x)")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    skipped = dict.fromkeys(f"{r['implementation']}: {r['note']}" for r in selection
                            if r["seconds"] == "")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    tables["selection"] = "\n".join(lines)
    return tables


def _millions(elements: int) -> str:
    return f"{elements / 1e6:.0f}M" if elements >= 10_000_000 else f"{elements / 1e6:.1f}M"


def _fmt(value, fmt: str, suffix: str = "") -> str:
    return "-" if value == "" else format(value, fmt) + suffix


def _step_bytes_text() -> str:
    """The bytes per element of every storage combination's step, for the summary."""
    return "; ".join(f"{s.label}: {s.step_bytes()} B (+{s.step_bytes(True) - s.step_bytes()} B "
                     f"with an event)" for s in STORAGE)


def write_markdown(path: str, rows: list[dict], peers_model: str, targets: list[Target],
                   files: list[str]) -> None:
    context = rows[0]
    command = context["command"]
    quick = "--quick" in command.split()
    bandwidth = [r for r in rows if r["section"] == "bandwidth"]
    loads = [r["load_1min"] for r in rows]
    cpus = os.cpu_count() or 1
    tables = markdown_tables(rows, peers_model)
    versions = f"torch {context['torch']}, mgpp_kernels {context['mgpp_kernels']}" + (
        f", triton {context['triton']}" if context["triton"] else "") + f", Python {context['python']}"
    lines = [
        "# Kernel microbenchmarks: latest results",
        "",
        *(["**A --quick smoke run: tiny models, the targets are meant for the full run.**", ""]
          if quick else []),
        f"Machine: **{context['machine']}** ({context['device']}); {versions}; run started "
        f"{context['started']} with `{command}`.",
        "",
        "Measured bandwidth, GB/s, best call (bytes with write-allocate: copy 12 B, triad 16 B, "
        "in-place add 12 B per element):",
        "",
        "| kernel | threads | start of the run | end of the run |",
        "|---|---:|---:|---:|",
        *[f"| {r['implementation']} | {r['threads']} | {r['gbps']:.1f} | {end['gbps']:.1f} |"
          for r, end in zip(bandwidth[:len(bandwidth) // 2], bandwidth[len(bandwidth) // 2:])],
        "",
        f"The roofline below is the best of these, {roofline_gbps(rows):.1f} GB/s.",
        "",
    ]
    if context["device"] == "cpu":
        high = max(loads) > cpus
        lines += [f"Load average (1 min) during the run: {min(loads):.1f} to {max(loads):.1f} on "
                  f"{cpus} CPUs" + (
                      ": the machine was shared with other jobs, so timings are noisy. Each "
                      "parallel region waits until every thread has a core again, so rows with "
                      "all threads suffer most, and most for peers that open many regions per "
                      "step (torch's per-tensor kernels); the 1-thread rows are the steadier "
                      "ones." if high else "."), ""]
    lines += [
        f"## Every peer on {peers_model} ({next(r['elements'] for r in rows if r['model'] == peers_model) / 1e6:.1f}M "
        "candidate elements), all threads",
        "",
        "One optimizer step over the candidate matrices only. \"event\": a step with a pruning event "
        "(τ selection and zeroing). GB/s counts the bytes per element docs/spec.md §3 says the "
        f"step must move ({_step_bytes_text()}), whatever the implementation really moves. Peak "
        "extra: growth of the peak "
        + ("resident set" if context["device"] == "cpu" else "allocated CUDA memory")
        + " above parameters, gradients and optimizer state during the timed steps.",
        "",
        f"`{RECIPE}`: torch.optim.AdamW(fused=True) + the prior gradient added to .grad in Python + "
        f"torch.cat/kthvalue masking on an event. `{COMPILED_REFERENCE}`: the reference's per-tensor "
        "step math (prior gradient + AdamW) under torch.compile, compile time excluded.",
        "",
        tables["peers"],
        "",
        "## Targets",
        "",
        "Judged on median times; in brackets, the same from each measurement's fastest call.",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
        *[f"| {t.text} | {t.value} | {'yes' if t.met else '**no**'} |" for t in targets],
        "",
        "## Scaling",
        "",
        tables["scaling"],
        "",
        "## τ selection (k = 0.9 N, exact; every method gives the same τ)",
        "",
        tables["selection"],
        "",
        "## Files",
        "",
        *[f"- `{os.path.basename(f)}`" for f in files],
        "",
        "Reproduce: `python benchmarks/suite.py` (CPU) or `python benchmarks/suite.py --device cuda` "
        "on a GPU machine (`python -m mgpp_kernels bench-suite` runs it too); `--quick` for a "
        "seconds-long smoke run.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def report(rows: list[dict], peers_model: str, output_dir: str) -> None:
    """The CSV, the plots and README.md in output_dir, and the tables and targets on the
    terminal."""
    os.makedirs(output_dir, exist_ok=True)
    slug = machine_slug(rows[0]["machine"])
    csv_path = os.path.join(output_dir, f"bench_suite_{slug}.csv")
    write_csv(csv_path, rows)
    files = [csv_path] + write_plots(rows, peers_model, output_dir, slug)
    targets = evaluate_targets(rows, peers_model)
    markdown_path = os.path.join(output_dir, "README.md")
    write_markdown(markdown_path, rows, peers_model, targets, files)

    tables = markdown_tables(rows, peers_model)
    print(f"\n{rows[0]['machine']}: every peer on {peers_model}\n")
    print(tables["peers"])
    print(f"\nScaling\n\n{tables['scaling']}\n\nτ selection\n\n{tables['selection']}\n")
    for target in targets:
        print(f"[{'met' if target.met else 'NOT MET'}] {target.text}: {target.value}")
    print("\nwrote " + ", ".join(files + [markdown_path]))
