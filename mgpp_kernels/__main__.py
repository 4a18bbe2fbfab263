"""python -m mgpp_kernels {info, verify, bench, bench-suite}."""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import torch

from . import __version__, verify
from .backends import BACKENDS, BackendUnavailableError, load_backend
from .machine import cpu_features, cpu_model

# The benchmarks are not part of the package (the suite needs matplotlib and tqdm, and every
# benchmark shares benchmarks/common/): they are the repository's benchmarks/, found beside the
# package in a checkout. Each command runs one of its scripts.
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
BENCHMARK_SCRIPTS = {"bench": "bench_step.py", "bench-suite": "suite.py"}


def info() -> int:
    print(f"mgpp_kernels {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"CUDA available: {torch.cuda.is_available()}; torch threads: {torch.get_num_threads()}")
    print(f"CPU: {cpu_model()}; features: {' '.join(cpu_features()) or 'unknown'}")
    for name in BACKENDS:
        try:
            load_backend(name)
            print(f"backend {name}: built")
        except BackendUnavailableError as error:
            print(f"backend {name}: not available ({error})")
    if hasattr(torch.ops.mgpp, "build_info"):
        print(torch.ops.mgpp.build_info())
    return 0


def run_benchmark(command: str, argv: list[str]) -> int:
    """Runs the benchmarks/ script of `command` of the checkout this package sits in, in its own
    process."""
    script = BENCHMARKS_DIR / BENCHMARK_SCRIPTS[command]
    if not script.is_file():
        print(f"{command} runs from a repository checkout: it is benchmarks/{script.name}, which "
              f"is not beside this mgpp_kernels ({Path(__file__).parent}); run `python "
              f"benchmarks/{script.name}` in a clone of the repository", file=sys.stderr)
        return 1
    return subprocess.run([sys.executable, str(script), *argv]).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgpp_kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="backends built, versions, CPU features")
    verify_parser = commands.add_parser("verify", help="every built backend against the reference")
    verify_parser.add_argument("--backend", action="append", help="only this backend (repeatable)")
    verify_parser.add_argument("--layers", type=int, default=2,
                               help="BERT-base encoder layers (default 2; 12 for the whole model)")
    commands.add_parser("bench", add_help=False,
                        help="step time against torch.optim.AdamW on BERT-base "
                             "(benchmarks/bench_step.py of a repository checkout)")
    commands.add_parser("bench-suite", add_help=False,
                        help="microbenchmarks against every peer, with plots (benchmarks/suite.py "
                             "of a repository checkout)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info()
    if args.command == "verify":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return verify.run(args.backend, args.layers)
    return run_benchmark(args.command, rest)


if __name__ == "__main__":
    sys.exit(main())
