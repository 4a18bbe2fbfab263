"""With the prior off and no pruning (prune=False groups), MGPP is torch.optim.AdamW: 100 steps,
fp32, max abs diff <= 1e-6 (docs/spec.md §4)."""
import pytest
import torch

from mgpp_kernels import MGPP

from helpers import SCHEDULE, backend_name, clone_params, gradient, make_params

import backends

SHAPES = [(1,), (7,), (4097,), (0,), (33, 65), (3, 1, 5)]
TOLERANCE = 1e-6
# prune=False everywhere on purpose: MGPP as AdamW.
pytestmark = pytest.mark.filterwarnings("ignore:MGPP. no param group has prune=True")


def _train(optimizer, params, steps, has_grad=None, scheduler=None):
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = gradient(t, i, p, scale=0.1) if has_grad is None or has_grad(t, i) else None
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _assert_matches_adamw(params, optimizer, adamw_params, adamw):
    for i, (p, q) in enumerate(zip(params, adamw_params)):
        p, state = p.detach().cpu(), {k: v.cpu() for k, v in optimizer.state.get(p, {}).items()}
        assert p.numel() == 0 or (p - q).abs().max().item() <= TOLERANCE, f"param {i}"
        if q in adamw.state:
            # torch's lerp may fuse a multiply-add, so m and v are not bitwise torch's; 1e-5
            # relative still catches a wrong (1 - β).
            expected = adamw.state[q]
            assert state["step"].item() == expected["step"].item()
            for key in ("exp_avg", "exp_avg_sq"):
                scale = expected[key].abs().max().item() if p.numel() else 0.0
                torch.testing.assert_close(state[key], expected[key], rtol=1e-5,
                                           atol=1e-6 * scale, msg=f"param {i} {key}")
        else:
            assert "exp_avg" not in state


def _pair(groups_of, backend, **hyperparameters):
    """MGPP (on the backend's device) and torch.optim.AdamW (on the CPU) over equal copies of the
    parameters, with the same groups."""
    adamw_params = make_params(SHAPES, scale=0.5)
    params = clone_params(adamw_params, device=backend.device)
    optimizer = MGPP([dict(g, prune=False) for g in groups_of(params)],
                     backend=backend_name(backend), **hyperparameters, **SCHEDULE)
    adamw = torch.optim.AdamW(groups_of(adamw_params), **hyperparameters)
    return params, optimizer, adamw_params, adamw


def _one_group(params):
    return [{"params": params}]


def _three_groups(params):
    return [{"params": params[:2], "lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6,
             "weight_decay": 0.1},
            {"params": params[2:4]},
            {"params": params[4:], "lr": 5e-4, "weight_decay": 0.0, "betas": (0.95, 0.9999)}]


HYPERPARAMETERS = {"defaults": dict(), "lr": dict(lr=1e-2, weight_decay=0.0),
                   "all": dict(lr=1e-3, betas=(0.5, 0.9), eps=1e-4, weight_decay=0.3)}


@pytest.mark.parametrize("backend,name", backends.over(backends.ROWS, sorted(HYPERPARAMETERS),
                                                       small_cases=["all"]))
def test_matches_adamw_for_100_steps(backend, name):
    params, optimizer, adamw_params, adamw = _pair(_one_group, backend, **HYPERPARAMETERS[name])
    _train(optimizer, params, 100)
    _train(adamw, adamw_params, 100)
    _assert_matches_adamw(params, optimizer, adamw_params, adamw)


def test_per_group_hyperparameters(any_backend):
    params, optimizer, adamw_params, adamw = _pair(_three_groups, any_backend, lr=2e-3,
                                                   weight_decay=0.01)
    _train(optimizer, params, 100)
    _train(adamw, adamw_params, 100)
    _assert_matches_adamw(params, optimizer, adamw_params, adamw)


SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / 10) * max(0.0, 1 - t / 100)),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.3),
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[1e-2, 2e-2, 5e-3], total_steps=100),
}


@pytest.mark.parametrize("backend,name", backends.over(backends.ROWS, list(SCHEDULERS),
                                                       small_cases=["one_cycle"]))
def test_lr_scheduler(backend, name):
    make_scheduler = SCHEDULERS[name]
    params, optimizer, adamw_params, adamw = _pair(_three_groups, backend, lr=2e-3,
                                                   weight_decay=0.01)
    _train(optimizer, params, 100, scheduler=make_scheduler(optimizer))
    _train(adamw, adamw_params, 100, scheduler=make_scheduler(adamw))
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in adamw.param_groups]
    _assert_matches_adamw(params, optimizer, adamw_params, adamw)


def test_parameters_without_gradients_in_some_steps(any_backend):
    """AdamW skips a parameter without a gradient and counts its own steps: so does MGPP."""
    params, optimizer, adamw_params, adamw = _pair(_one_group, any_backend, weight_decay=0.01)

    def has_grad(t, i):
        return (i != 1 or t % 3 != 0) and (i != 4 or t >= 40) and i != 5

    _train(optimizer, params, 100, has_grad)
    _train(adamw, adamw_params, 100, has_grad)
    _assert_matches_adamw(params, optimizer, adamw_params, adamw)
    assert optimizer.state[params[1]]["step"].item() == 66
    assert optimizer.state[params[4]]["step"].item() == 60


def test_non_candidates_are_adamw_while_candidates_are_pruned(any_backend):
    """The prune=False group is AdamW through every stage of the schedule, whatever happens to
    the candidates beside it."""
    adamw_params = make_params(SHAPES, scale=0.5)
    params = clone_params(adamw_params, device=any_backend.device)
    candidates = make_params([(40, 50), (7,)], seed=1, device=any_backend.device)
    optimizer = MGPP([{"params": candidates, "prune": True}, {"params": params}],
                     backend=any_backend.name, weight_decay=0.01, **SCHEDULE)
    adamw = torch.optim.AdamW(adamw_params, weight_decay=0.01)
    everything = params + candidates
    _train(optimizer, everything, 30)
    _train(adamw, adamw_params, 30)
    assert optimizer.stats()["sparsity"] >= 0.85
    _assert_matches_adamw(params, optimizer, adamw_params, adamw)


def test_prior_off_without_pruning_is_torch_adamw(kernel_backend):
    """100 steps of one prune=False group, 4097 elements among them (a full block and a tail on
    the GPU paths): θ and v within 1e-6 of torch.optim.AdamW's."""
    generator = torch.Generator().manual_seed(0)
    theirs = [torch.nn.Parameter(torch.randn(s, generator=generator) * 0.02)
              for s in [(4097,), (7,), (1,)]]
    ours = clone_params(theirs, device=kernel_backend.device)
    optimizer = MGPP([{"params": ours, "prune": False}], lr=1e-3, weight_decay=0.01,
                     backend=kernel_backend.name, num_train_examples=10, initial_warmup_steps=10,
                     total_steps=200)
    adamw = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01)
    for t in range(100):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            generator = torch.Generator().manual_seed(1009 * t + i)
            q.grad = torch.randn(q.shape, generator=generator) * 0.01
            p.grad = q.grad.to(p.device, copy=True)
        optimizer.step()
        adamw.step()
    for p, q in zip(ours, theirs):
        assert (p.detach().cpu() - q).abs().max().item() <= 1e-6
        assert (optimizer.state[p]["exp_avg_sq"].cpu()
                - adamw.state[q]["exp_avg_sq"]).abs().max() <= 1e-6
