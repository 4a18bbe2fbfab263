"""The suite's two plots: time per element against size, and the fraction of the measured
bandwidth (scaling, and every peer on the peers model)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from .results import series_label  # noqa: E402


def write_plots(rows: list[dict], peers_model: str, output_dir: str, slug: str) -> list[str]:
    steps = [r for r in rows if r["section"] == "step"]
    models = list(dict.fromkeys(r["model"] for r in steps))
    series: dict[str, list[dict]] = {}
    for r in steps:
        series.setdefault(series_label(r["implementation"], r["precision"], r["event"],
                                        r["threads"]), []).append(r)
    scaled = {label: rs for label, rs in series.items() if len(rs) == len(models) and len(rs) > 1}
    selection: dict[str, list[dict]] = {}
    for r in rows:
        if r["section"] == "selection" and r["seconds"] != "":
            selection.setdefault(r["implementation"], []).append(r)

    paths = []
    figure, (steps_axes, selection_axes) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, rs in scaled.items():
        steps_axes.plot([r["elements"] for r in rs], [r["ns_per_element"] for r in rs], "o-",
                        label=label)
    steps_axes.set(xscale="log", yscale="log", xlabel="candidate elements", ylabel="ns per element",
                   title="optimizer step, time per element")
    if scaled:
        steps_axes.legend(fontsize=7)
    for method, rs in selection.items():
        selection_axes.plot([r["elements"] for r in rs], [r["ns_per_element"] for r in rs], "o-",
                            label=method)
    selection_axes.set(xscale="log", yscale="log", xlabel="candidate elements",
                       ylabel="ns per element", title="τ selection (k = 0.9 N), time per element")
    if selection:
        selection_axes.legend(fontsize=7)
    for axes in (steps_axes, selection_axes):
        axes.xaxis.set_minor_formatter(NullFormatter())
    figure.suptitle(rows[0]["machine"], fontsize=9)
    figure.tight_layout()
    paths.append(os.path.join(output_dir, f"time_vs_size_{slug}.png"))
    figure.savefig(paths[-1], dpi=90)
    plt.close(figure)

    figure, (scaling_axes, peers_axes) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, rs in scaled.items():
        scaling_axes.plot([r["elements"] for r in rs], [r["fraction_of_bandwidth"] for r in rs],
                          "o-", label=label)
    scaling_axes.axhline(0.8, color="grey", linestyle="--", linewidth=0.8)
    scaling_axes.set(xscale="log", xlabel="candidate elements", ylabel="fraction of measured bandwidth",
                     title="achieved / measured bandwidth (docs/spec.md §3 bytes)", ylim=(0, None))
    if scaled:
        scaling_axes.legend(fontsize=7)
    scaling_axes.xaxis.set_minor_formatter(NullFormatter())
    all_threads = max((r["threads"] for r in steps if r["threads"] != ""), default="")
    peers = [r for r in steps if r["model"] == peers_model and r["threads"] == all_threads]
    labels = [series_label(r["implementation"], r["precision"], r["event"], "") for r in peers]
    fractions = [r["fraction_of_bandwidth"] for r in peers]
    peers_axes.barh(range(len(peers)), fractions)
    for y, fraction in enumerate(fractions):
        peers_axes.annotate(f" {fraction:.0%}", (fraction, y), va="center", fontsize=7)
    peers_axes.set_yticks(range(len(peers)), labels, fontsize=7)
    peers_axes.invert_yaxis()
    peers_axes.axvline(0.8, color="grey", linestyle="--", linewidth=0.8)
    peers_axes.set(xlabel="fraction of measured bandwidth", title=f"every peer, {peers_model}")
    figure.suptitle(rows[0]["machine"], fontsize=9)
    figure.tight_layout()
    paths.append(os.path.join(output_dir, f"bandwidth_{slug}.png"))
    figure.savefig(paths[-1], dpi=90)
    plt.close(figure)
    return paths
