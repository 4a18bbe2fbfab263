"""python -m mgpp_kernels {info, verify, bench, bench-suite}."""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import torch

from . import __version__, bench, verify
from .backends import BACKENDS, BackendUnavailableError, load_backend

# The benchmark suite is not part of the package (it needs matplotlib and tqdm): it is the
# repository's benchmarks/suite.py, found beside the package in a checkout.
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def info() -> int:
    print(f"mgpp_kernels {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"CUDA available: {torch.cuda.is_available()}; torch threads: {torch.get_num_threads()}")
    print(f"CPU: {bench.cpu_model()}; features: {' '.join(_cpu_features()) or 'unknown'}")
    for name in BACKENDS:
        try:
            load_backend(name)
            print(f"backend {name}: built")
        except BackendUnavailableError as error:
            print(f"backend {name}: not available ({error})")
    if hasattr(torch.ops.mgpp, "build_info"):
        print(torch.ops.mgpp.build_info())
    return 0


def _cpu_features() -> list[str]:
    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "asimd", "sve")
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def bench_suite(argv: list[str]) -> int:
    """Runs benchmarks/suite.py of the checkout this package sits in, in its own process."""
    suite = BENCHMARKS_DIR / "suite.py"
    if not suite.is_file():
        print(f"bench-suite runs from a repository checkout: it is benchmarks/suite.py, which is "
              f"not beside this mgpp_kernels ({Path(__file__).parent}); run `python "
              f"benchmarks/suite.py` in a clone of the repository", file=sys.stderr)
        return 1
    return subprocess.run([sys.executable, str(suite), *argv]).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgpp_kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="backends built, versions, CPU features")
    verify_parser = commands.add_parser("verify", help="every built backend against the reference")
    verify_parser.add_argument("--backend", action="append", help="only this backend (repeatable)")
    verify_parser.add_argument("--layers", type=int, default=2,
                               help="BERT-base encoder layers (default 2; 12 for the whole model)")
    commands.add_parser("bench", help="step time against torch.optim.AdamW", add_help=False)
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
    if args.command == "bench-suite":
        return bench_suite(rest)
    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
