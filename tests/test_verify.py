"""`python -m mgpp_kernels verify` fails a NaN or an infinity where the reference is finite: in the
comparison itself, and end to end on a backend that writes one. It runs the layers it is asked
for, and says so on stdout where the Triton interpreter makes it run a smaller width."""
from __future__ import annotations

import math

import pytest
import torch

from mgpp_kernels import available_backends, verify
from mgpp_kernels.backends import load_backend
from mgpp_kernels.workloads import SMALL_BERT, BertShapes

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("value, expected, ratio", [
    (1.0, 1.0, 0.0),
    (1.5, 1.0, 0.5),
    (NAN, 1.0, INF),
    (INF, 1.0, INF),
    (-INF, 1.0, INF),
    (1.0, NAN, INF),
    (1.0, INF, INF),
    (-INF, INF, INF),
    (NAN, NAN, 0.0),       # both runs propagate the same non-finite value: they agree
    (INF, INF, 0.0),
])
def test_worst_bound_ratio_fails_non_finite_values(value, expected, ratio):
    values = torch.tensor([0.25, value])
    expectation = torch.tensor([0.25, expected])
    assert verify.worst_bound_ratio(values, expectation, torch.ones(2)) == ratio


def test_one_nan_among_many_fails_the_result():
    ref = torch.full((1000,), 0.5)
    theta = ref.clone()
    theta[123] = NAN
    error = verify.one_step_error((theta, ref, ref), (ref, ref, ref), ref, ref, ref, 0.9, 0.999)
    assert error == {"theta": INF, "m": 0.0, "v": 0.0}
    result = verify.Result("cpu", 1000, error, True, 0.0, 0.0, 0.0)
    assert not result.ok
    assert not verify.Result("cpu", 1000, {"theta": 0.0, "m": NAN, "v": 0.0}, True, 0.0, 0.0,
                             0.0).ok


@pytest.mark.skipif("cpu" not in available_backends(), reason="the cpu backend is not built")
def test_verify_fails_a_backend_that_writes_nan(monkeypatch):
    clean = verify.verify_backend("cpu", torch.device("cpu"), SMALL_BERT)
    assert clean.ok, clean

    backend = load_backend("cpu")
    step = backend.step

    def step_writing_nan(groups, event, grad_scale, schedule=None):
        threshold = step(groups, event, grad_scale, schedule)
        # The last step only (the prior is off by then): one θ of the first candidate goes NaN.
        if int(groups[0].state_steps[0]) == verify.SCHEDULE["total_steps"]:
            with torch.no_grad():
                groups[0].params[0].view(-1)[0] = NAN
        return threshold

    monkeypatch.setattr(backend, "step", step_writing_nan)
    poisoned = verify.verify_backend("cpu", torch.device("cpu"), SMALL_BERT)
    assert poisoned.step_error["theta"] == INF
    assert not poisoned.ok


@pytest.mark.parametrize("backend, expected, notice", [
    ("cpu", BertShapes(layers=3, hidden=768), None),
    ("triton", BertShapes(layers=3, hidden=SMALL_BERT.hidden),
     "triton: --layers 3 asks for 3 BERT-base layers of width 768; the Triton interpreter "
     "(TRITON_INTERPRET=1) runs every program instance in Python, far too slowly for that width, "
     "so this runs 3 layers of width 64 instead"),
])
def test_verify_runs_the_layers_asked_for_or_says_what_it_runs(monkeypatch, capsys, backend,
                                                               expected, notice):
    """The layer count is honoured everywhere; under the interpreter the width is not, and
    stdout says what was asked, what runs and why."""
    runs = []

    def record(name, device, shapes):
        runs.append((name, device, shapes))
        return verify.Result(name, shapes.candidate_elements, {"theta": 0.0, "m": 0.0, "v": 0.0},
                             True, 0.0, 0.0, 0.0)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(verify, "verify_backend", record)
    assert verify.run([backend], layers=3) == 0
    assert runs == [(backend, torch.device("cpu"), expected)]
    out = capsys.readouterr().out
    assert (notice in out) if notice else ("asks for" not in out)
    assert f"verifying {backend} on cpu (3 layers of width {expected.hidden})" in out


def test_verify_says_why_it_skips_triton_without_a_gpu_or_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(verify, "verify_backend", pytest.fail)
    assert verify.run(["triton"], layers=3) == 1
    assert capsys.readouterr().out.splitlines() == [
        "triton: skipped (no GPU; set TRITON_INTERPRET=1 to run it in the interpreter)",
        "no backend besides the reference is built"]
