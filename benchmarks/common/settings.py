"""The workload settings every benchmark's optimizers run with: AdamW's hyperparameters, MGPP's
prior at its defaults (docs/spec.md §1) with n = SST-2's training set, and the schedules that make
a step an event or not."""
from __future__ import annotations

from mgpp_kernels.config import MGPPConfig
from mgpp_kernels.workloads import SST2_TRAIN_EXAMPLES

NUM_TRAIN_EXAMPLES = SST2_TRAIN_EXAMPLES
LR, BETAS, EPS = 1e-5, (0.9, 0.999), 1e-8
_DEFAULTS = MGPPConfig(num_train_examples=NUM_TRAIN_EXAMPLES, initial_warmup_steps=0)
LAMBDA_MIX, SIGMA0_SQ, SIGMA1_SQ = _DEFAULTS.lambda_mix, _DEFAULTS.sigma0_sq, _DEFAULTS.sigma1_sq
FINAL_SPARSITY = _DEFAULTS.final_sparsity

# Dense stage with the prior on: no step is an event, no weight is pruned.
DENSE_SCHEDULE = dict(total_steps=2_000_000, initial_warmup_steps=1_000_000)
# Pruning stage from step 0, whose step prunes to s_i; no event after it. The pruned weights then
# sit in the spike, as between the events of a training run.
PRUNED_SCHEDULE = dict(total_steps=1_000_000, initial_warmup_steps=0, pruning_interval=1_000_000)
# Pruning stage from step 0 with an event every step.
EVENT_SCHEDULE = dict(total_steps=1_000_000, initial_warmup_steps=0, pruning_interval=1)
