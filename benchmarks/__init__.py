"""The repository's benchmarks, outside the package (the suite needs matplotlib and tqdm).

Scripts:
- suite.py: the kernel microbenchmarks against every peer, with plots (`python -m mgpp_kernels
  bench-suite` runs it from a checkout).
- bench_step.py: one MGPP step against torch.optim.AdamW on BERT-base, every storage combination
  (`python -m mgpp_kernels bench` runs it from a checkout).
- bench_arithmetic.py: the cpu step's arithmetic per element against its memory time.
- gpu/bench_gpu.py: the GPU-only checks of MGPP cuda and triton, then both against fused AdamW on
  one GPU (gpu/run.sh, the prepared GPU run, runs it among its stages).

Shared modules, in common/, the one library every script measures with: storage (the table of
storage combinations and the bytes their steps move), settings (the optimizers' workload
settings), timing (CPU and CUDA timers, back-to-back calls, the copy and its bandwidth, thread
counts, the suite's platforms), agreement (the bound within which two backends agree on a step,
which tests/test_rounding.py asserts), memory (peak memory), machine (CPU model and features,
versions), models (the suite's ladder of candidate sets and their tensors), peers (every
implementation the suite measures, τ selection methods), runner (the suite's run), results (rows
and CSV), report (targets, tables, README.md) and plots.
"""
