"""The reference backend: mgpp_kernels.reference applied tensor by tensor."""
from __future__ import annotations

import torch

from .. import reference
from ..masks import pack_mask, unpack_mask
from ..patterns import NMPattern
from .device_schedule import DeviceSchedule
from .types import PruneEvent, Threshold, UpdateGroup


def gather_magnitudes(params: list[torch.Tensor], process_group,
                      pattern: NMPattern | None = None) -> torch.Tensor:
    """|θ| of the candidates of every rank's shards, in rank order: the oracle's way across
    processes (it sends the weights; the kernels send histograms). all_gather takes equal sizes:
    pad, then trim."""
    local = torch.cat([reference.candidate_magnitudes(p, pattern) for p in params]
                      or [torch.zeros(0)])
    world = torch.distributed.get_world_size(process_group)
    sizes = [local.new_zeros(1, dtype=torch.int64) for _ in range(world)]
    torch.distributed.all_gather(sizes, local.new_full((1,), local.numel(), dtype=torch.int64),
                                 group=process_group)
    longest = max(int(size) for size in sizes)
    padded = [local.new_zeros(longest) for _ in range(world)]
    mine = torch.cat([local, local.new_zeros(longest - local.numel())])
    torch.distributed.all_gather(padded, mine, group=process_group)
    return torch.cat([chunk[:int(size)] for chunk, size in zip(padded, sizes)])


class ReferenceBackend:
    name = "reference"
    steps_on_device = False
    ranks_across_processes = True
    schedules_on_device = False
    ranks_nm_pools = True

    def check_params(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                raise ValueError(f"the reference backend takes float64, float32, bfloat16 and "
                                 f"float16 parameters, got {p.dtype}")

    def step(self, groups: list[UpdateGroup], events: list[PruneEvent],
             grad_scale: torch.Tensor | None,
             schedule: DeviceSchedule | None = None) -> list[Threshold] | None:
        if schedule is not None:
            raise ValueError("the reference backend follows the schedule on the host: it takes "
                             "no DeviceSchedule")
        for group in groups:
            for i, param in enumerate(group.params):
                self._update(group, i, param, grad_scale)
        return [self._prune(event) for event in events]

    @staticmethod
    def _prune(event: PruneEvent) -> Threshold:
        if event.process_group is None:
            tau = reference.global_threshold(event.params, event.k, event.pattern)
        else:
            tau = torch.kthvalue(gather_magnitudes(event.params, event.process_group,
                                                   event.pattern), event.k).values
        pruned = torch.zeros((), dtype=torch.int64, device=tau.device)
        for i, param in enumerate(event.params):
            keep = reference.keep_mask(param, tau, event.pattern)
            pruned += (~keep).sum()
            param.masked_fill_(~keep, 0)
            if event.keep_masks:
                event.keep_masks[i].copy_(pack_mask(keep))
        if event.process_group is not None:
            torch.distributed.all_reduce(pruned, group=event.process_group)
        return Threshold(tau=tau, pruned=pruned)

    def global_threshold(self, tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        return reference.global_threshold(tensors, k)

    @staticmethod
    def _update(group: UpdateGroup, i: int, param: torch.Tensor,
                grad_scale: torch.Tensor | None) -> None:
        # Math in float32 (float64 for float64 tensors), stored back with round-to-nearest-even.
        compute = torch.promote_types(param.dtype, torch.float32)
        theta = param.detach().to(compute, copy=True)
        grad = group.grads[i].to(compute, copy=True)
        if grad_scale is not None:
            grad = grad / grad_scale.to(compute)
        if group.prior is not None:
            prior = group.prior
            grad = grad + reference.prior_gradient(theta, prior.lambda_t, prior.sigma0_sq,
                                                   prior.sigma1_sq, prior.num_train_examples)
        exp_avg = group.exp_avgs[i].to(compute, copy=True)
        exp_avg_sq = group.exp_avg_sqs[i].to(compute, copy=True)
        group.state_steps[i] += 1
        reference.adamw_update(theta, grad, exp_avg, exp_avg_sq, int(group.state_steps[i].item()),
                               float(group.lr), group.beta1, group.beta2, group.eps, group.weight_decay)
        if group.keep_masks:
            theta.masked_fill_(~unpack_mask(group.keep_masks[i], theta), 0)
        param.detach().copy_(theta)
        group.exp_avgs[i].copy_(exp_avg)
        group.exp_avg_sqs[i].copy_(exp_avg_sq)


BACKEND = ReferenceBackend()
