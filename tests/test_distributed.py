"""MGPP on torch.distributed (gloo, two processes on this machine, started here).

(a) DistributedDataParallel: both ranks end bit-identical, and equal to a single-process run on
    the same global batches (its gradient is the mean of the two half-batch gradients, the
    computation DDP's all-reduce does).
(b) Sharded parameters: FSDP2 (fully_shard, DTensor parameters) and plain shards with
    process_group=: the global τ comes from all-reduced radix histograms (the cpu backend sends
    only counts, never a weight; the reference gathers magnitudes, as the oracle), and the
    reassembled shards, masks included, equal a single-process run on the whole model bit for bit.

tests/distributed_worker.py is the rank's program; the single-process runs use its functions.
"""
from __future__ import annotations

import collections
import io
import os
import socket
import subprocess
import sys

import pytest
import torch

from mgpp_kernels import masks, schedule

import mgpp_kernels
from mgpp_kernels.ops.layout import HIGH_BINS, LOW_BINS

import backends
import distributed_worker as worker
from compare import assert_bitwise_equal
from helpers import REPO_ROOT, TESTS_DIR

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available()
    or backends.BY_NAME["cpu"].unavailable is not None,
    reason="needs torch.distributed with gloo and the cpu backend")]


def ranking_rows(rows=backends.ROWS, requires: tuple[str, ...] = ()):
    """Every row of `rows` (the table of tests/backends.py): those that rank across processes,
    have the capabilities `requires` names and take CPU tensors run (gloo); the others skip with
    the reason."""
    params = []
    for row in rows:
        marks = row.marks(("ranks_across_processes",) + requires)
        if row.device != "cpu":
            marks.append(pytest.mark.skip(reason=f"backend {row.name!r}: these ranks run gloo on "
                                                 f"CPU tensors, its tensors are on {row.device}"))
        params.append(pytest.param(row.name, id=row.name, marks=marks))
    return params


def running(params) -> set[str]:
    """The backends of `params` that are not skipped."""
    return {p.values[0] for p in params if not any(m.name == "skip" for m in p.marks)}


# The ranks (tests/distributed_worker.py) run exactly the scenarios these tests compare.
assert running(ranking_rows()) == set(worker.BACKENDS)
assert running(ranking_rows(requires=("schedules_on_device",))) == set(
    worker.DEVICE_SCHEDULE_BACKENDS)
assert running(ranking_rows(requires=("ranks_nm_pools",))) == set(worker.NM_BACKENDS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs both ranks once; returns load(scenario) -> [rank 0's results, rank 1's]."""
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(worker.WORLD_SIZE), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    processes = [subprocess.Popen([sys.executable, str(TESTS_DIR / "distributed_worker.py"),
                                   str(out)], env=dict(env, RANK=str(rank)), cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(worker.WORLD_SIZE)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [(rank, p.returncode, text) for rank, (p, text) in enumerate(zip(processes, outputs))
              if p.returncode != 0]
    assert not failed, "\n".join(f"rank {r} exited {code}:\n{text[-3000:]}"
                                 for r, code, text in failed)

    def load(scenario):
        return [torch.load(out / f"{scenario}_rank{rank}.pt", weights_only=False)
                for rank in range(worker.WORLD_SIZE)]
    return load


def single_process_model_run(backend: str):
    """The whole model in one process on the same global batches: each step's gradient is the
    mean of the two half-batch gradients, summed in rank order, as the data-parallel ranks get."""
    model = worker.make_model()
    optimizer = worker.model_optimizer(model, backend)
    params = list(model.parameters())
    for t in range(worker.SCHEDULE["total_steps"]):
        half_grads = []
        for rank in range(worker.WORLD_SIZE):
            model.zero_grad(set_to_none=True)
            worker.loss_on(model, *worker.local_batch(t, rank)).backward()
            half_grads.append([p.grad.clone() for p in params])
        for p, grads in zip(params, zip(*half_grads)):
            p.grad = grads[0] / worker.WORLD_SIZE + grads[1] / worker.WORLD_SIZE
        optimizer.step()
    return params, optimizer


def unpacked_masks(optimizer):
    return [masks.unpack_mask(optimizer.state[p]["keep_mask"], p)
            for group in optimizer.param_groups if group["prune"] for p in group["params"]]


def test_ddp_ranks_identical_and_equal_to_single_process(ranks):
    rank0, rank1 = ranks("ddp")
    for i, (a, b) in enumerate(zip(rank0["params"], rank1["params"])):
        assert_bitwise_equal(a, b, f"param {i}: rank 0 vs rank 1")
    for i, (a, b) in enumerate(zip(rank0["masks"], rank1["masks"])):
        assert torch.equal(a, b), f"keep mask {i}: rank 0 vs rank 1"
    params, optimizer = single_process_model_run("cpu")
    for i, (a, p) in enumerate(zip(rank0["params"], params)):
        assert_bitwise_equal(a, p.detach(), f"param {i}: DDP vs one process")
    weights = optimizer.param_groups[0]["params"]
    for i, (a, p) in enumerate(zip(rank0["masks"], weights)):
        assert torch.equal(a, optimizer.state[p]["keep_mask"]), f"keep mask {i}"
    assert rank0["stats"]["tau"] == optimizer.stats()["tau"]
    assert optimizer.stats()["sparsity"] == pytest.approx(0.8, abs=0.01)


@pytest.mark.parametrize("backend", ranking_rows())
def test_fsdp2_shards_equal_single_process(ranks, backend):
    results = ranks(f"fsdp_{backend}")
    params, optimizer = single_process_model_run(backend)
    # FSDP2 shards dim 0 in rank order (torch.chunk): the shards put back together are the model.
    for i, p in enumerate(params):
        whole = torch.cat([r["params"][i] for r in results])
        assert_bitwise_equal(whole, p.detach(), f"param {i}: FSDP2 vs one process")
    for i, (p, mask) in enumerate(zip(optimizer.param_groups[0]["params"],
                                      unpacked_masks(optimizer))):
        shards = [masks.unpack_mask(r["masks"][i], r["params"][2 * i]) for r in results]
        assert torch.equal(torch.cat(shards), mask), f"keep mask {i}: FSDP2 vs one process"
    stats = optimizer.stats()
    for rank, result in enumerate(results):
        assert result["tau"] == stats["tau"], f"rank {rank}: τ"
        assert result["pruned"] == stats["pruned"], f"rank {rank}: pruned count (global)"


def sharded_scenarios():
    """(backend, capturable): ranking_rows(), and again with the schedule on the device."""
    host = [pytest.param(p.values[0], False, id=p.id, marks=p.marks) for p in ranking_rows()]
    return host + [pytest.param(p.values[0], True, id=f"{p.id}-capturable", marks=p.marks)
                   for p in ranking_rows(requires=("schedules_on_device",))]


def assert_shards_reassemble(results, held, optimizer) -> None:
    """The ranks' shards of every candidate, and of its keep mask, put back together in rank
    order equal the single process's bit for bit."""
    keep = dict(zip(held, unpacked_masks(optimizer)))
    for i, p in held.items():
        pieces = [r["held"][i] for r in results if i in r["held"]]
        assert_bitwise_equal(torch.cat(pieces), p.detach(), f"candidate {i}")
        mask_pieces = [masks.unpack_mask(r["masks"][i], r["held"][i])
                       for r in results if i in r["held"]]
        assert torch.equal(torch.cat(mask_pieces), keep[i]), f"keep mask {i}"


@pytest.mark.parametrize("backend,capturable", sharded_scenarios())
def test_sharded_candidates_with_process_group_equal_single_process(ranks, backend, capturable):
    """Each rank's shards equal the single process's (host schedule) bit for bit, masks too."""
    results = ranks(f"shards_{backend}{'_capturable' if capturable else ''}")
    held, other, optimizer = worker.shards_run(None, backend)
    assert_shards_reassemble(results, held, optimizer)
    stats = optimizer.stats()
    for rank, result in enumerate(results):
        assert_bitwise_equal(result["other"], other.detach(), f"rank {rank}: non-candidate")
        assert result["tau"] == stats["tau"], f"rank {rank}: τ"
        assert result["pruned"] == stats["pruned"], f"rank {rank}: pruned count (global)"
        assert result["event_sparsity"] == stats["event_sparsity"], f"rank {rank}: over global N"
    assert stats["event_sparsity"] == stats["pruned"] / sum(p.numel() for p in held.values())
    # Rank 1 holds only bfloat16 candidates: it must still join rank 0's second radix level.
    assert {results[1]["held"][i].dtype for i in results[1]["held"]} == {torch.bfloat16}


@pytest.mark.parametrize("backend", ranking_rows(requires=("ranks_nm_pools",)))
def test_pools_with_nm_over_process_group_equal_single_process(ranks, backend):
    """Three pools (2:4, unstructured to 50% and to 80%) of shards on two ranks: each pool's τ,
    pruned count and N, and every candidate and mask, equal a single process bit for bit."""
    results = ranks(f"pools_{backend}")
    held, other, optimizer = worker.shards_run(None, backend, pools=True)
    assert_shards_reassemble(results, held, optimizer)
    expected = optimizer.stats()["pools"]
    assert [pool["pattern"] for pool in expected] == ["2:4", "unstructured", "unstructured"]
    for rank, result in enumerate(results):
        for pool, mine in zip(expected, result["pools"]):
            for key in ("tau", "pruned", "numel", "event_sparsity", "target_sparsity"):
                assert mine[key] == pool[key], f"rank {rank}, {pool['pattern']}: {key}"
    for i in (0, 1):   # the 2:4 candidates end 2:4
        assert int((held[i].detach().reshape(-1, 4) != 0).sum(dim=1).max()) <= 2


# The collectives of one event: N (1 count), the level-0 histogram (65536 counters), the level-1
# histogram (32768 counters); a process group always takes the second level.
EVENT_COLLECTIVES = [1, HIGH_BINS, LOW_BINS]


@pytest.mark.parametrize("backend", ranking_rows(backends.KERNELS))
def test_kernel_backends_send_histograms_never_weights(ranks, backend):
    """Each event's collectives, and one more level-0 histogram at an event whose τ falls outside
    the window around the previous τ that the cpu update counted (a pass then counts every
    bin): never a weight, and every rank the same."""
    events = sum(1 for t in range(worker.SCHEDULE["total_steps"])
                 if schedule.target_sparsity(mgpp_kernels.MGPPConfig(
                     **{k: v for k, v in worker.SCHEDULE.items()}), t) is not None)
    expected = collections.Counter(EVENT_COLLECTIVES * events)
    sent = []
    for rank, result in enumerate(ranks(f"shards_{backend}")):
        collectives = result["collectives"]
        assert [name for name, _ in collectives] == ["all_reduce"] * len(collectives)
        sizes = collections.Counter(size for _, size in collectives)
        assert not expected - sizes, f"rank {rank}: an event's collective is missing"
        recounts = sizes - expected
        assert set(recounts) <= {HIGH_BINS} and recounts[HIGH_BINS] < events, f"rank {rank}"
        sent.append(sorted(collectives))
    assert all(s == sent[0] for s in sent)


@pytest.mark.parametrize("backend", ranking_rows(backends.KERNELS, ("schedules_on_device",)))
def test_the_device_schedule_all_reduces_histograms_at_every_step(ranks, backend):
    """On the device schedule the host does not know which step prunes: both histograms are
    all-reduced at every step (zeros when it does not), N once; never a weight."""
    steps = worker.SCHEDULE["total_steps"]
    for rank, result in enumerate(ranks(f"shards_{backend}_capturable")):
        assert sorted(result["collectives"]) == sorted(
            [("all_reduce", 1)] + [("all_reduce", HIGH_BINS), ("all_reduce", LOW_BINS)] * steps)


# ---- checks in this process, on a one-rank group --------------------------------------------

@pytest.fixture
def one_rank_mesh():
    """A one-rank gloo group in this process and its 1-D device mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                          rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        torch.distributed.destroy_process_group()


def test_dtensor_candidates_need_shards_of_one_kind(one_rank_mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    sharded = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), one_rank_mesh, [Shard(0)]))
    replicated = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), one_rank_mesh,
                                                      [Replicate()]))
    plain = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match="1-D device mesh"):
        worker.MGPP([{"params": [replicated], "prune": True}], backend="cpu", **worker.SCHEDULE)
    with pytest.raises(ValueError, match="all DTensors"):
        worker.MGPP([{"params": [sharded, plain], "prune": True}], backend="cpu",
                    **worker.SCHEDULE)
    optimizer = worker.MGPP([{"params": [sharded], "prune": True}], backend="cpu",
                            **worker.SCHEDULE)
    with pytest.raises(ValueError, match="all DTensors"):
        optimizer.add_param_group({"params": [plain], "prune": True})
    with pytest.raises(TypeError, match="state_dict"):
        torch.save(optimizer, io.BytesIO())


@pytest.mark.parametrize("backend", ranking_rows())
def test_one_rank_dtensor_run_equals_plain_run(one_rank_mesh, backend):
    """DTensor parameters (sharded over one rank) train exactly like the plain tensors."""
    from torch.distributed.tensor import Shard, distribute_tensor
    plain_model = worker.make_model()
    dtensor_model = worker.make_model()
    for module in dtensor_model:
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(distribute_tensor(p.detach(), one_rank_mesh,
                                                                       [Shard(0)])))
    runs = []
    for model in (plain_model, dtensor_model):
        optimizer = worker.model_optimizer(model, backend)
        for t in range(worker.SCHEDULE["total_steps"]):
            generator = torch.Generator().manual_seed(t)
            for p in model.parameters():
                grad = torch.randn(p.shape, generator=generator) * 0.05
                p.grad = (distribute_tensor(grad, one_rank_mesh, [Shard(0)])
                          if hasattr(p, "to_local") else grad)
            optimizer.step()
        runs.append((model, optimizer))
    (plain_model, plain_opt), (dtensor_model, dtensor_opt) = runs
    assert dtensor_opt.stats() == plain_opt.stats()
    for (name, p), q in zip(plain_model.named_parameters(), dtensor_model.parameters()):
        assert_bitwise_equal(q.to_local().detach(), p.detach(), name)
        for key, value in plain_opt.state[p].items():
            other = dtensor_opt.state[q][key]
            assert_bitwise_equal(other.to_local() if hasattr(other, "to_local") else other,
                                 value, f"{name} {key}")
