"""Runs of tests/test_resume.py, each in a fresh process.

    resume_worker.py train OUT VARIANT:BACKEND...
        The uninterrupted run of each model variant on each backend; at every stop in STOPS it
        saves the model's and the optimizer's state_dict with torch.save
        (OUT/<variant>_<backend>_stop<n>.pt: n steps taken), and at the end
        OUT/<variant>_<backend>_final.pt.
    resume_worker.py resume OUT VARIANT:SAVED_BACKEND:RESUME_BACKEND[:STOP,STOP...]...
        For each and each stop (all of STOPS unless listed): a fresh model and optimizer on
        RESUME_BACKEND load
        OUT/<variant>_<saved>_stop<n>.pt (torch.load, weights_only) and run to the end:
        OUT/<variant>_<saved>_to_<resume>_stop<n>.pt.

Variants: "loss" trains a model with a bfloat16 candidate among float32 ones on a loss, so a
step's gradients depend on the parameters; "fixed" is all float32 with gradients that are a fixed
function of the step: docs/spec.md §4's bound for 50+ steps on another backend bounds the optimizer, and a
loss would amplify the backends' rounding differences through the model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mgpp_kernels import MGPP

import backends   # tests/backends.py: the device of each backend's row

# t_i = 10, events at 10, 14, 21, 28, 35, 42 and the freeze at t_end = 60 - 10 - 1 = 49.
SCHEDULE = dict(num_train_examples=500, initial_warmup_steps=10, total_steps=60,
                final_warmup_steps=10, pruning_interval=7, initial_sparsity=0.3,
                final_sparsity=0.8)
# Steps taken before the save: before t_i, right before and after the first event, between
# events, right before and after a cubic event, right before and after the freeze, frozen.
STOPS = (6, 10, 11, 17, 21, 22, 49, 50, 55)


class Net(torch.nn.Module):
    """Float32 and (variant "loss") bfloat16 candidates, one candidate that has a gradient only
    on even steps, and non-candidates (biases, the head)."""

    def __init__(self, variant: str):
        super().__init__()
        generator = torch.Generator().manual_seed(1234)
        self.fc1 = torch.nn.Linear(24, 48)
        self.fc2 = torch.nn.Linear(48, 24)
        self.gate = torch.nn.Linear(24, 24, bias=False)
        self.head = torch.nn.Linear(24, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        if variant == "loss":
            self.fc2.weight.data = self.fc2.weight.data.to(torch.bfloat16)

    def forward(self, x, use_gate: bool):
        h = torch.relu(self.fc1(x))
        h = F.linear(h, self.fc2.weight.float(), self.fc2.bias)
        if use_gate:
            h = h + torch.tanh(self.gate(h))
        return self.head(h)

    def candidates(self):
        return [self.fc1.weight, self.fc2.weight, self.gate.weight]


def build(variant: str, backend: str):
    model = Net(variant).to(backends.BY_NAME[backend].device)
    candidate_ids = {id(p) for p in model.candidates()}
    groups = [{"params": model.candidates(), "prune": True},
              {"params": [p for p in model.parameters() if id(p) not in candidate_ids],
               "prune": False}]
    return model, MGPP(groups, lr=3e-3, weight_decay=0.01, backend=backend, **SCHEDULE)


def train_step(variant: str, model: Net, optimizer: MGPP, t: int) -> None:
    generator = torch.Generator().manual_seed(10_000 + t)
    device = model.fc1.weight.device
    optimizer.zero_grad()
    if variant == "loss":
        x = torch.randn(16, 24, generator=generator).to(device)
        y = torch.randint(0, 5, (16,), generator=generator).to(device)
        F.cross_entropy(model(x, use_gate=t % 2 == 0), y).backward()
    else:
        for name, p in model.named_parameters():
            if name != "gate.weight" or t % 2 == 0:
                p.grad = (torch.randn(p.shape, generator=generator) * 0.05).to(device)
    optimizer.step()


def checkpoint(model: Net, optimizer: MGPP) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def train(out: Path, runs: list[str]) -> None:
    for run in runs:
        variant, backend = run.split(":")
        model, optimizer = build(variant, backend)
        for t in range(SCHEDULE["total_steps"]):
            if t in STOPS:
                torch.save(checkpoint(model, optimizer), out / f"{variant}_{backend}_stop{t}.pt")
            train_step(variant, model, optimizer, t)
        torch.save(checkpoint(model, optimizer), out / f"{variant}_{backend}_final.pt")


def resume(out: Path, runs: list[str]) -> None:
    for run in runs:
        variant, saved, resumed, *listed = run.split(":")
        for stop in [int(s) for s in listed[0].split(",")] if listed else STOPS:
            saved_state = torch.load(out / f"{variant}_{saved}_stop{stop}.pt", weights_only=True)
            model, optimizer = build(variant, resumed)
            model.load_state_dict(saved_state["model"])
            optimizer.load_state_dict(saved_state["optimizer"])
            assert optimizer.state_dict()["mgpp"]["schedule_step"] == stop
            for t in range(stop, SCHEDULE["total_steps"]):
                train_step(variant, model, optimizer, t)
            torch.save(checkpoint(model, optimizer),
                       out / f"{variant}_{saved}_to_{resumed}_stop{stop}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    command, out, *rest = sys.argv[1:]
    {"train": train, "resume": resume}[command](Path(out), rest)
