"""The suite's results: one row (a dict) per measurement, with the columns below, in a CSV."""
from __future__ import annotations

import csv
import re

COLUMNS = ("machine", "device", "torch", "triton", "mgpp_kernels", "python", "command", "started",
           "load_1min",
           "section", "model", "elements", "implementation", "precision", "event", "threads",
           "repeats", "seconds", "best_seconds", "ns_per_element", "bytes_per_element", "gbps",
           "fraction_of_bandwidth", "vs_fused_adamw", "peak_extra_mib", "tau", "note")


def roofline_gbps(rows: list[dict]) -> float:
    return max(r["gbps"] for r in rows if r["section"] == "bandwidth")


def series_label(implementation: str, precision: str, event: bool, threads) -> str:
    label = f"{implementation} {precision}" + (" event" if event else "")
    return label + (f", {threads} thread{'s' if threads != 1 else ''}" if threads != "" else "")


def machine_slug(machine: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")


def read_csv(path: str) -> list[dict]:
    """Rows as write_csv wrote them, with numbers and flags typed again."""
    integers = ("elements", "threads", "repeats", "bytes_per_element")
    floats = ("load_1min", "seconds", "best_seconds", "ns_per_element", "gbps",
              "fraction_of_bandwidth", "vs_fused_adamw", "peak_extra_mib")
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key in integers + floats:
                if row[key] != "":
                    row[key] = int(row[key]) if key in integers else float(row[key])
            if row["event"] != "":
                row["event"] = row["event"] == "True"
            rows.append(row)
    return rows


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)  # floats in full: read_csv gets the very same numbers back
