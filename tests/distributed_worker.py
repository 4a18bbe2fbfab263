"""One rank of tests/test_distributed.py: torch.distributed on gloo, started by the test as
`python distributed_worker.py OUT` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.

Every rank runs, in order, and saves what it holds to OUT/<scenario>_rank<r>.pt:
- "ddp": DistributedDataParallel over the whole model; each rank trains on its half of every
  global batch, MGPP (cpu backend) runs on the full, replicated parameters.
- "fsdp_<backend>": FSDP2 (fully_shard on each Linear and the root); MGPP gets DTensor
  parameters, updates this rank's shards and ranks τ over every rank's (the device mesh's group).
- "shards_<backend>": plain tensors, each rank holding a shard of the candidates, MGPP given
  process_group=; rank 1 holds only bfloat16 candidates, rank 0 float32 and bfloat16 ones.
  "shards_<backend>_capturable": the same with the schedule on the device (cpu, triton).
- "pools_<backend>": plain shards as above in three pools (2:4, unstructured to 50% and to 80%),
  for the backends that rank N:M pools.

The single-process runs the test compares with are built from the same functions.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mgpp_kernels import MGPP

import backends   # tests/backends.py

WORLD_SIZE = 2
# t_i = 4, events at 4, 6, 9, 12 and the freeze at t_end = 20 - 4 - 1 = 15; frozen after.
SCHEDULE = dict(num_train_examples=64, initial_warmup_steps=4, total_steps=20,
                final_warmup_steps=4, pruning_interval=3, initial_sparsity=0.3,
                final_sparsity=0.8)
GLOBAL_BATCH = 8
# The rows of tests/backends.py that rank across processes and run here on CPU tensors (gloo).
BACKENDS = tuple(row.name for row in backends.ROWS if row.ranks_across_processes
                 and row.device == "cpu" and row.unavailable is None)
# Those that also run with the schedule on the device (capturable=True), and with N:M pools.
DEVICE_SCHEDULE_BACKENDS = tuple(name for name in BACKENDS
                                 if backends.BY_NAME[name].schedules_on_device)
NM_BACKENDS = tuple(name for name in BACKENDS if backends.BY_NAME[name].ranks_nm_pools)


# ---- a model trained on data-parallel batches (DDP and FSDP2) ----------------------------------

def make_model() -> torch.nn.Sequential:
    """Odd sizes, so that FSDP2's dim-0 shards are uneven (31 rows: 16 + 15; 5 rows: 3 + 2)."""
    generator = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(12, 31), torch.nn.ReLU(), torch.nn.Linear(31, 17),
                                torch.nn.ReLU(), torch.nn.Linear(17, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def model_optimizer(model: torch.nn.Module, backend: str, **kwargs) -> MGPP:
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return MGPP([{"params": weights, "prune": True}, {"params": biases, "prune": False}],
                lr=1e-2, weight_decay=0.01, backend=backend, **SCHEDULE, **kwargs)


def global_batch(t: int):
    generator = torch.Generator().manual_seed(500 + t)
    return (torch.randn(GLOBAL_BATCH, 12, generator=generator),
            torch.randint(0, 5, (GLOBAL_BATCH,), generator=generator))


def local_batch(t: int, rank: int):
    x, y = global_batch(t)
    rows = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
    return x[rows], y[rows]


def loss_on(model, x, y):
    return F.cross_entropy(model(x), y)


def keep_masks(optimizer: MGPP) -> list[torch.Tensor]:
    """The candidates' keep masks, in param-group order."""
    return [optimizer.state[p]["keep_mask"].clone() for group in optimizer.param_groups
            if group["prune"] for p in group["params"]]


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def run_ddp(rank: int, out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel
    model = make_model()
    optimizer = model_optimizer(model, "cpu")
    ddp = DistributedDataParallel(model)
    for t in range(SCHEDULE["total_steps"]):
        optimizer.zero_grad()
        loss_on(ddp, *local_batch(t, rank)).backward()
        optimizer.step()
    torch.save({"params": [p.detach().clone() for p in model.parameters()],
                "masks": keep_masks(optimizer), "stats": optimizer.stats()},
               out / f"ddp_rank{rank}.pt")


def run_fsdp(rank: int, out: Path, backend: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = model_optimizer(model, backend)
    for t in range(SCHEDULE["total_steps"]):
        optimizer.zero_grad()
        loss_on(model, *local_batch(t, rank)).backward()
        optimizer.step()
    stats = optimizer.stats()
    torch.save({"params": [local(p).detach().clone() for p in model.parameters()],
                "masks": keep_masks(optimizer), "tau": stats["tau"], "pruned": stats["pruned"]},
               out / f"fsdp_{backend}_rank{rank}.pt")


# ---- candidates sharded by hand (process_group=) -----------------------------------------------

# The whole model's candidates: (shape, dtype); each is split by rows between the ranks.
SHARDED_CANDIDATES = [((40, 9), torch.float32), ((33,), torch.bfloat16), ((1, 7), torch.float32),
                      ((0, 3), torch.float32), ((64,), torch.bfloat16)]


# The pools scenario's candidates (shape, dtype, param-group keys), whole rows to each rank.
POOL_CANDIDATES = [((40, 8), torch.float32, {"pattern": "2:4"}),
                   ((33, 12), torch.bfloat16, {"pattern": "2:4"}),
                   ((9, 7), torch.float32, {"final_sparsity": 0.5}),
                   ((64,), torch.bfloat16, {"final_sparsity": 0.5}),
                   ((30, 5), torch.bfloat16, {})]


def held_rows(dtype: torch.dtype, rows: int, rank: int | None) -> slice | None:
    """The rows of a candidate of `dtype` that `rank` holds (None: none; rank None: the whole
    model). Rank 0 holds the float32 candidates and the first third of each bfloat16 one, rank 1
    the rest of the bfloat16 ones: rank 1 has no candidate that needs the second radix level."""
    if rank is None:
        return slice(None)
    if dtype != torch.bfloat16:
        return slice(None) if rank == 0 else None
    return slice(0, rows // 3) if rank == 0 else slice(rows // 3, rows)


def whole_candidates(layout=SHARDED_CANDIDATES) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [(torch.randn(shape, generator=generator) * 0.1).to(dtype)
            for shape, dtype, *_ in layout]


def whole_gradient(t: int, index: int, like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(900 + 31 * t + index)
    return (torch.randn(like.shape, generator=generator) * 0.02).to(like.dtype)


def shards_run(rank: int | None, backend: str, process_group=None, capturable=False,
               pools=False):
    """This rank's shards of the candidates (the whole tensors when rank is None) plus one
    replicated non-candidate, trained on fixed gradients through the whole schedule; with
    `pools`, POOL_CANDIDATES in their pools, else SHARDED_CANDIDATES in one. Returns
    {candidate index: parameter}, the non-candidate and the optimizer."""
    layout = POOL_CANDIDATES if pools else [(shape, dtype, {}) for shape, dtype in
                                            SHARDED_CANDIDATES]
    whole = whole_candidates(layout)
    rows = {i: held_rows(w.dtype, w.shape[0], rank) for i, w in enumerate(whole)}
    held = {i: torch.nn.Parameter(whole[i][r].clone()) for i, r in rows.items() if r is not None}
    other = torch.nn.Parameter(torch.linspace(-1, 1, 6))
    # One param group per candidate: the same keys form one pool, as they would in one group.
    groups = [{"params": [p], "prune": True, **layout[i][2]} for i, p in held.items()]
    optimizer = MGPP(groups + [{"params": [other], "prune": False}],
                     lr=1e-2, weight_decay=0.01, backend=backend, process_group=process_group,
                     capturable=capturable, **SCHEDULE)
    for t in range(SCHEDULE["total_steps"]):
        for i, p in held.items():
            p.grad = whole_gradient(t, i, whole[i])[rows[i]].clone()
        other.grad = torch.full_like(other, 0.01 * (t % 3 - 1))
        optimizer.step()
    return held, other, optimizer


def run_shards(rank: int, out: Path, backend: str, capturable=False, pools=False) -> None:
    # Every collective MGPP makes, as (name, element count): the kernels must send counts only.
    collectives = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def recording(name):
        def collective(tensor_or_list, *args, **kwargs):
            target = args[0] if name == "all_gather" else tensor_or_list
            collectives.append((name, target.numel()))
            return originals[name](tensor_or_list, *args, **kwargs)
        return collective

    for name in originals:
        setattr(dist, name, recording(name))
    try:
        held, other, optimizer = shards_run(rank, backend, process_group=dist.group.WORLD,
                                            capturable=capturable, pools=pools)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    stats = optimizer.stats()
    torch.save({"held": {i: p.detach().clone() for i, p in held.items()},
                "other": other.detach().clone(),
                "masks": dict(zip(held, keep_masks(optimizer))),
                "tau": stats["tau"], "pruned": stats["pruned"],
                "event_sparsity": stats["event_sparsity"], "pools": stats["pools"],
                "collectives": collectives},
               out / f"{'pools' if pools else 'shards'}_{backend}"
                     f"{'_capturable' if capturable else ''}_rank{rank}.pt")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=120))
    try:
        run_ddp(rank, out)
        for backend in BACKENDS:
            run_fsdp(rank, out, backend)
            run_shards(rank, out, backend)
        for backend in DEVICE_SCHEDULE_BACKENDS:
            run_shards(rank, out, backend, capturable=True)
        for backend in NM_BACKENDS:
            run_shards(rank, out, backend, pools=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
