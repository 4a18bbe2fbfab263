"""The kernel microbenchmarks: `python benchmarks/suite.py`, or `python -m mgpp_kernels bench-suite`
in a checkout. Needs matplotlib and tqdm, which the package does not.

Everything runs in one process on the same tensors, in three sections:

- bandwidth: a copy (a = b), a triad (a = b + s·c) and an in-place add (a += b) with torch on
  large arrays, at every thread count, at the start and at the end of the run. Bytes count the
  traffic of a write-allocate cache: copy 12 B per element (b read, a read for ownership, a
  written), triad 16 B, in-place add 12 B. The roofline is the best of them all: counting the
  read-for-ownership can only raise it, so fractions of it are never flattered.
- step: one optimizer step over a candidate set. On the peers model (BERT-base's 84.9M candidate
  elements) every peer runs: MGPP on every built backend (without and with a pruning event), the reference, the reference's per-tensor step math under torch.compile,
  torch.optim.AdamW default / foreach / fused, and the unfused recipe a user would write. There and
  on one tensor of its size, every storage combination (bf16 + bf16 state, bf16 + fp32 state,
  fp16 + fp16 state) runs without and with an event beside fused AdamW in the same dtype, with
  1 thread and with all threads. On every
  model of the size ladder (1.6M to 354M elements) the kernel backends and fused AdamW run with
  1 thread and with all threads.
- selection: τ, the k-th smallest |θ| (k = 0.9 N), by radix histograms against torch.cat + kthvalue,
  topk and sort (those two only up to sizes where they take seconds, not minutes, on a CPU).

Bytes per step are what docs/spec.md §3 says a step must move, per element, in each storage
combination (the table of benchmarks/common/storage.py): θ, g, m, v read and θ, m, v written once;
an event adds one read and one write of θ (the pass that zeroes below τ's bin). Achieved GB/s =
those bytes / step time; the fraction is of the roofline.

Peak memory is how far the process's peak grows above what it holds before the timed steps
(parameters, gradients, the optimizer's state): resident set on a CPU,
torch.cuda.max_memory_allocated on a GPU.

Writes a CSV (one row per measurement, with machine, versions and load), two PNG plots and a
markdown summary to --output-dir.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Run as a script, this folder is on sys.path, not the checkout: put the checkout first, so that
# the suite finds benchmarks.common and measures the mgpp_kernels beside it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common.models import BERT_BASE, FULL_LADDER, QUICK_LADDER, one_tensor  # noqa: E402
from benchmarks.common.peers import RECIPE  # noqa: E402
from benchmarks.common.report import report  # noqa: E402
from benchmarks.common.results import read_csv  # noqa: E402
from benchmarks.common.runner import Suite  # noqa: E402
from benchmarks.common.timing import CpuPlatform, CudaPlatform  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/suite.py",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, short budgets: a smoke run of a few seconds")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile'd reference (compiling takes ~1 min on 2 cores)")
    parser.add_argument("--threads", type=lambda text: [int(t) for t in text.split(",")],
                        default=None, help="CPU thread counts to compare, e.g. 1,2 (default: 1 and "
                                           "torch.get_num_threads()); the peers use the largest")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed calls per measurement (default 3 on a CPU, 1 on a "
                             "GPU, --quick 0.02)")
    parser.add_argument("--max-repeats", type=int, default=None,
                        help="at most this many timed calls per measurement (default 5)")
    parser.add_argument("--max-elements", type=float, default=None,
                        help="leave out ladder models with more candidate elements (e.g. 1e8 on a "
                             "machine with less than 16 GiB)")
    parser.add_argument("--from-csv", metavar="CSV",
                        help="no measurements: render the plots and README.md again from a CSV "
                             "this suite wrote")
    parser.add_argument("--output-dir", default=os.path.join("benchmarks", "results"),
                        help="where the CSV, plots and README.md go (default benchmarks/results)")
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(arguments)
    if args.from_csv:
        rows = read_csv(args.from_csv)
        recipe_models = [r["model"] for r in rows if r["implementation"] == RECIPE]
        report(rows, recipe_models[0] if recipe_models else next(
            r["model"] for r in rows if r["section"] == "step"), args.output_dir)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench-suite --device cuda: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a machine with a GPU", file=sys.stderr)
        return 1
    if args.threads is not None and min(args.threads) < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    suite_platform = CudaPlatform() if args.device == "cuda" else CpuPlatform(args.threads)
    ladder = tuple(m for m in (QUICK_LADDER if args.quick else FULL_LADDER)
                   if args.max_elements is None or m.elements <= args.max_elements)
    if not ladder:
        parser.error(f"--max-elements {args.max_elements:g} leaves no model to run")
    peers_model = BERT_BASE if BERT_BASE in ladder else ladder[0]
    suite = Suite(platform=suite_platform, ladder=ladder + (one_tensor(peers_model),),
                  peers_model=peers_model,
                  budget=args.budget if args.budget is not None else (
                      0.02 if args.quick else 1.0 if args.device == "cuda" else 3.0),
                  max_repeats=args.max_repeats or (2 if args.quick else 5),
                  compile_reference=not args.no_compile,
                  command=" ".join(["python benchmarks/suite.py", *arguments]))
    if args.quick:
        suite.platform.bandwidth_elements = 2**20
    started = time.perf_counter()
    rows = suite.run()
    elapsed = time.perf_counter() - started

    report(rows, suite.peers_model.name, args.output_dir)
    print(f"{len(rows)} measurements in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
