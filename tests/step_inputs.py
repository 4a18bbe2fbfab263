"""The inputs of one backend step on the host schedule (Backend.step(groups, event, grad_scale))
for the tests that call a backend directly, without the optimizer: θ, g, m, v, step counts and
keep masks of a list of shapes, and the docs/spec.md §4 bound of one step."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mgpp_kernels import masks, reference
from mgpp_kernels.backends.types import Prior, PruneEvent, UpdateGroup

from compare import assert_bitwise_equal, assert_fp32_bound

PRIOR = Prior(lambda_t=0.05, sigma0_sq=1e-10, sigma1_sq=0.05, num_train_examples=1000)
BETA1, BETA2 = 0.9, 0.999


def prune_event(params, k, keep_masks=()) -> PruneEvent:
    """The PruneEvent of ranking `params` (every candidate, with or without a gradient) at k."""
    return PruneEvent(params=list(params), k=k, keep_masks=list(keep_masks))


@dataclass
class StepTensors:
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    steps: list[torch.Tensor]
    keep_masks: list[torch.Tensor]

    @staticmethod
    def make(shapes, dtype, state_dtype, seed=0, step=3.0, masked=False, device="cpu",
             spike_runs=False):
        generator = torch.Generator().manual_seed(seed)

        def randn(shape, scale):
            return torch.randn(shape, generator=generator) * scale

        params = []
        for shape in shapes:
            theta = randn(shape, 0.02)
            # Every fourth value tiny, so the spike weight ρ0 takes values between 0 and 1 (for
            # the others exp overflows and ρ0 = 0), and some exact zeros. With spike_runs, in
            # each 1024 elements the second quarter all tiny and the third none, so that the cpu
            # kernels' runs take each route: the spike for every weight, for none, and for the
            # tiny ones compressed.
            position = torch.arange(theta.numel()) % 1024
            tiny = position % 4 == 0
            if spike_runs:
                tiny = (tiny | ((position >= 256) & (position < 512))) & ~(
                    (position >= 512) & (position < 768))
            theta.view(-1)[tiny] *= 1e-4
            theta.view(-1)[::11] = 0.0
            params.append(theta.to(dtype))
        tensors = StepTensors(
            params=params,
            grads=[randn(s, 0.01).to(dtype) for s in shapes],
            exp_avgs=[randn(s, 1e-3).to(state_dtype) for s in shapes],
            exp_avg_sqs=[(torch.rand(s, generator=generator) * 1e-5).to(state_dtype)
                         for s in shapes],
            steps=[torch.tensor(step) for _ in shapes],
            keep_masks=[masks.pack_mask(torch.rand(s, generator=generator) > 0.3)
                        for s in shapes] if masked else [])
        return tensors.clone(device=device)

    def clone(self, dtype=None, state_dtype=None, device=None):
        def copy_all(tensors, to):
            return [t.to(device=device or t.device, dtype=to or t.dtype, copy=True)
                    for t in tensors]
        return StepTensors(copy_all(self.params, dtype), copy_all(self.grads, dtype),
                           copy_all(self.exp_avgs, state_dtype),
                           copy_all(self.exp_avg_sqs, state_dtype), copy_all(self.steps, None),
                           copy_all(self.keep_masks, None))

    def group(self, prior=PRIOR, event=None, weight_decay=0.01):
        return UpdateGroup(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps,
                           self.keep_masks, lr=1e-3, beta1=BETA1, beta2=BETA2, eps=1e-8,
                           weight_decay=weight_decay, prior=prior, event=event)

    def assert_equal(self, other: "StepTensors", what: str) -> None:
        for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
            for i, (a, b) in enumerate(zip(getattr(self, name), getattr(other, name),
                                           strict=True)):
                assert_bitwise_equal(a, b, f"{what}: {name}[{i}]")


def total_gradient(before: StepTensors, i, prior, grad_scale):
    """g as the update sees it: unscaled, with the prior gradient (fp32, as the reference)."""
    g = before.grads[i].float().cpu() / grad_scale
    if prior is not None:
        g = g + reference.prior_gradient(before.params[i].float().cpu(), prior.lambda_t,
                                         prior.sigma0_sq, prior.sigma1_sq,
                                         prior.num_train_examples)
    return g


def assert_fp32_step_bound(actual: StepTensors, expected: StepTensors, before: StepTensors,
                           prior, grad_scale):
    """docs/spec.md §4, fp32, one step: |diff| <= 1e-6 + 1e-5·s, s the largest magnitude entering."""
    for i in range(len(before.params)):
        g = total_gradient(before, i, prior, grad_scale)
        theta_old, m_old, v_old = (t[i].cpu() for t in (before.params, before.exp_avgs,
                                                        before.exp_avg_sqs))
        theta, m, v = (t[i].cpu() for t in (expected.params, expected.exp_avgs,
                                            expected.exp_avg_sqs))
        theta_scale = torch.maximum(theta.abs(), theta_old.abs())
        m_scale = torch.maximum(torch.maximum(m.abs(), BETA1 * m_old.abs()), (1 - BETA1) * g.abs())
        v_scale = torch.maximum(torch.maximum(v, BETA2 * v_old), (1 - BETA2) * g * g)
        for name, scale in (("params", theta_scale), ("exp_avgs", m_scale),
                            ("exp_avg_sqs", v_scale)):
            assert_fp32_bound(getattr(actual, name)[i], getattr(expected, name)[i], scale,
                              f"{name}[{i}]")
        assert actual.steps[i].item() == expected.steps[i].item()
