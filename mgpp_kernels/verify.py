"""`python -m mgpp_kernels verify`: every built backend against the reference, docs/spec.md §4's
bounds.

Each backend runs a BERT-base-shaped set of tensors through every stage of the schedule twice:
synced (its state is reset to the reference's before each step, so each step is a one-step
comparison from the same input) and free-running (its own state throughout, for the end-to-end
bounds). On every pruning event, τ is also selected by the backend from the reference's weights and
must equal kthvalue's bit for bit. A NaN or an infinity where the reference is finite fails.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch

from . import reference, schedule
from .backends import available_backends, load_backend
from .optimizer import MGPP
from .workloads import SMALL_BERT, SST2_TRAIN_EXAMPLES, BertShapes, bert_base, random_parameters

SCHEDULE = dict(total_steps=16, initial_warmup_steps=2, final_warmup_steps=3, pruning_interval=3,
                initial_sparsity=0.3, final_sparsity=0.9, num_train_examples=SST2_TRAIN_EXAMPLES)
# Steps 0-1 dense, 2 prunes to s_i, 3/6/9 cubic events, 12 = t_end freezes, 13-15 frozen.


@dataclasses.dataclass
class Result:
    backend: str
    elements: int
    step_error: dict[str, float]      # worst |diff| / docs/spec.md §4 one-step bound, per quantity
    tau_exact: bool                   # τ from the same weights equals kthvalue's, every event
    step_mask_diff: float             # worst fraction of mask positions that differ after a step
    final_rel_error: float            # ‖θ_backend − θ_ref‖ / ‖θ_ref‖ after the free run, where
                                      # both runs agree on the mask
    final_mask_diff: float

    @property
    def ok(self) -> bool:
        # Written so that a NaN anywhere fails: every comparison with NaN is False.
        return (all(error <= 1.0 for error in self.step_error.values()) and self.tau_exact
                and self.step_mask_diff <= 1e-3 and self.final_rel_error <= 1e-4
                and self.final_mask_diff <= 1e-3)


def make_model(shapes: BertShapes, device: torch.device, seed: int = 0
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The candidate matrices and the encoder's non-candidate vectors (biases, LayerNorm); the
    embeddings and the pooler are left out: they would only add plain AdamW work to every run."""
    generator = torch.Generator().manual_seed(seed)
    candidates = random_parameters(shapes.candidate_shapes(), generator, std=0.04, device=device)
    others = random_parameters(shapes.encoder_other_shapes(), generator, std=0.02, device=device)
    return candidates, others


def _optimizer(candidates, others, backend: str) -> MGPP:
    return MGPP([{"params": candidates, "prune": True}, {"params": others, "prune": False}],
                lr=2e-3, weight_decay=0.01, backend=backend, **SCHEDULE)


def worst_bound_ratio(value: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> float:
    """The largest |value − expected| / bound over the elements, NaN-safe: a non-finite value
    where `expected` differs (a NaN or an infinity where the reference is finite, or a finite
    value where it is not) counts as infinitely far; the same NaN or infinity on both sides as
    equal."""
    ratio = (value - expected).abs() / bound
    same_non_finite = (value.isnan() & expected.isnan()) | (value.isinf() & (value == expected))
    ratio = torch.where(same_non_finite, 0.0, torch.where(ratio.isnan(), math.inf, ratio))
    return float(ratio.max()) if ratio.numel() else 0.0


def one_step_error(new, ref_new, ref_old_m, ref_old_v, grad_total, beta1, beta2
                   ) -> dict[str, float]:
    """docs/spec.md §4's one-step fp32 bound, worst ratio over elements, for θ, m and v."""
    theta, m, v = new
    ref_theta, ref_m, ref_v = ref_new
    scale_m = torch.maximum(torch.maximum(ref_m.abs(), beta1 * ref_old_m.abs()),
                            (1 - beta1) * grad_total.abs())
    scale_v = torch.maximum(torch.maximum(ref_v, beta2 * ref_old_v), (1 - beta2) * grad_total ** 2)
    return {
        "theta": worst_bound_ratio(theta, ref_theta, 1e-6 + 1e-5 * ref_theta.abs()),
        "m": worst_bound_ratio(m, ref_m, 1e-6 + 1e-5 * scale_m),
        "v": worst_bound_ratio(v, ref_v, 1e-6 + 1e-5 * scale_v),
    }


def verify_backend(name: str, device: torch.device, shapes: BertShapes) -> Result:
    backend = load_backend(name)
    ref_cand, ref_other = make_model(shapes, device)
    free_cand, free_other = make_model(shapes, device)
    sync_cand, sync_other = make_model(shapes, device)
    ref_params, free_params, sync_params = ref_cand + ref_other, free_cand + free_other, sync_cand + sync_other
    ref_opt = _optimizer(ref_cand, ref_other, "reference")
    free_opt = _optimizer(free_cand, free_other, name)
    sync_opt = _optimizer(sync_cand, sync_other, name)
    config = ref_opt.config
    beta1, beta2 = ref_opt.defaults["betas"]
    generator = torch.Generator().manual_seed(1)
    base_grads = [(torch.randn(p.shape, generator=generator) * 1e-3).to(device) for p in ref_params]
    noise = [(torch.randn(p.shape, generator=generator) * 1e-3).to(device) for p in ref_params]

    worst = {"theta": 0.0, "m": 0.0, "v": 0.0}
    tau_exact, step_mask_diff = True, 0.0
    numel = sum(p.numel() for p in ref_cand)
    for t in range(config.total_steps):
        grads = [b + n * ((-1) ** t) * (1 + t / 4) for b, n in zip(base_grads, noise)]
        for params in (ref_params, free_params, sync_params):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        sync_opt.load_state_dict(ref_opt.state_dict())
        with torch.no_grad():
            for p, q in zip(sync_params, ref_params):
                p.copy_(q)
        point = schedule.schedule_at(config, t)
        if point.prune_to is not None:
            k = schedule.prune_count(numel, point.prune_to)
            same = backend.global_threshold(ref_cand, k)
            tau_exact &= bool(torch.equal(same, reference.global_threshold(ref_cand, k)))
        old_m = [ref_opt.state[p]["exp_avg"].clone() if p in ref_opt.state else torch.zeros_like(p)
                 for p in ref_params]
        old_v = [ref_opt.state[p]["exp_avg_sq"].clone() if p in ref_opt.state else torch.zeros_like(p)
                 for p in ref_params]
        prior_grads = [reference.prior_gradient(p.detach(), point.lambda_t, config.sigma0_sq,
                                                config.sigma1_sq, config.num_train_examples)
                       if point.prior_on and i < len(ref_cand) else torch.zeros_like(p)
                       for i, p in enumerate(ref_params)]
        ref_opt.step()
        sync_opt.step()
        free_opt.step()
        for i, (p, q) in enumerate(zip(sync_params, ref_params)):
            error = one_step_error(
                (p.detach(), sync_opt.state[p]["exp_avg"], sync_opt.state[p]["exp_avg_sq"]),
                (q.detach(), ref_opt.state[q]["exp_avg"], ref_opt.state[q]["exp_avg_sq"]),
                old_m[i], old_v[i], grads[i] + prior_grads[i], beta1, beta2)
            for key in worst:
                worst[key] = max(worst[key], error[key])
        differ = sum(int(((p == 0) != (q == 0)).sum()) for p, q in zip(sync_cand, ref_cand))
        step_mask_diff = max(step_mask_diff, differ / numel)

    # A weight that one run prunes and the other keeps (allowed in ≤ 0.1% of P) then evolves
    # differently by design, so θ is compared where both runs agree on the mask.
    with torch.no_grad():
        diff = norm = torch.zeros((), dtype=torch.float64)
        for i, (p, q) in enumerate(zip(free_params, ref_params)):
            agree = (p == 0) == (q == 0) if i < len(free_cand) else torch.ones_like(p, dtype=torch.bool)
            diff = diff + ((p - q).double()[agree] ** 2).sum()
            norm = norm + (q.double()[agree] ** 2).sum()
        diff, norm = diff.sqrt(), norm.sqrt()
    final_mask = sum(int(((p == 0) != (q == 0)).sum()) for p, q in zip(free_cand, ref_cand)) / numel
    return Result(name, numel, worst, tau_exact, step_mask_diff, float(diff / norm), final_mask)


def format_table(results: list[Result]) -> str:
    header = ("backend", "elements", "θ err/bound", "m err/bound", "v err/bound", "τ exact",
              "mask diff (step)", "final rel err", "final mask diff", "status")
    rows = [header]
    for r in results:
        rows.append((r.backend, f"{r.elements:,}", f"{r.step_error['theta']:.3f}",
                     f"{r.step_error['m']:.3f}", f"{r.step_error['v']:.3f}",
                     "yes" if r.tau_exact else "NO", f"{r.step_mask_diff:.2e}",
                     f"{r.final_rel_error:.2e}", f"{r.final_mask_diff:.2e}",
                     "ok" if r.ok else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(backends: list[str] | None = None, layers: int = 2) -> int:
    names = [b for b in (backends or available_backends()) if b != "reference"]
    results = []
    for name in names:
        device = torch.device("cpu")
        shapes = bert_base(layers)
        if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            asked = shapes
            shapes = dataclasses.replace(asked, hidden=SMALL_BERT.hidden)
            print(f"triton: --layers {layers} asks for {layers} BERT-base layers of width "
                  f"{asked.hidden}; the Triton interpreter (TRITON_INTERPRET=1) runs every "
                  f"program instance in Python, far too slowly for that width, so this runs "
                  f"{shapes.layers} layers of width {shapes.hidden} instead")
        elif name in ("triton", "cuda") and torch.cuda.is_available():
            device = torch.device("cuda")
        elif name == "triton":
            print("triton: skipped (no GPU; set TRITON_INTERPRET=1 to run it in the interpreter)")
            continue
        elif name == "cuda":
            print("cuda: skipped (no GPU)")
            continue
        print(f"verifying {name} on {device} ({shapes.layers} layers of width {shapes.hidden}) ...",
              flush=True)
        results.append(verify_backend(name, device, shapes))
    if not results:
        print("no backend besides the reference is built")
        return 1
    print(format_table(results))
    failed = [r.backend for r in results if not r.ok]
    print("FAILED: " + ", ".join(failed) if failed else "all backends within docs/spec.md §4")
    return 1 if failed else 0
