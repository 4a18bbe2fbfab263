"""The repository's benchmarks, outside the package (they need matplotlib and tqdm).

Scripts:
- suite.py: the kernel microbenchmarks against every peer, with plots (`python -m mgpp_kernels
  bench-suite` runs it from a checkout).
- bench_step.py: one MGPP step against torch.optim.AdamW on BERT-base, the package's
  `python -m mgpp_kernels bench`.

Shared modules, in common/: models (the ladder of candidate sets and their tensors), timing (CPU
and CUDA timers, peak memory), peers (every implementation measured, τ selection methods), runner
(the suite's run), results (rows and CSV), report (bars, tables, README.md) and plots.
"""
