"""How MGPP's candidates are spread over processes: one process, shards ranked over a
torch.distributed process group (process_group=), or FSDP2 DTensor shards ranked over their device
mesh's group. N and τ are then global: backends all-reduce radix histograms, never weights."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    # FSDP2 (fully_shard) parameters are DTensors. torch.distributed.tensor is imported only when
    # a tensor subclass shows up, which keeps `import mgpp_kernels` light.
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view the kernels update in place); other tensors as is."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class Sharding:
    group: Any = None              # the group τ ranks over; None for one process
    dtensors: bool | None = None   # candidates are DTensors (None before the first candidate)
    by_mesh: bool = False          # `group` is the DTensor candidates' device mesh's

    def with_candidates(self, candidates: list[torch.Tensor]) -> "Sharding":
        """The sharding once these candidates join. Candidates are all DTensors (FSDP2) or none;
        without process_group=, DTensor candidates must be shards on one 1-D device mesh, whose
        group then ranks them."""
        kinds = {is_dtensor(p) for p in candidates}
        if len(kinds) > 1 or (kinds and self.dtensors not in (None, *kinds)):
            raise ValueError("MGPP's candidates must be all DTensors (FSDP2) or none")
        sharding = replace(self, dtensors=kinds.pop()) if kinds else self
        if not sharding.dtensors or (sharding.group is not None and not sharding.by_mesh):
            return sharding
        from torch.distributed.tensor import Shard
        group = sharding.group
        for p in candidates:
            if p.device_mesh.ndim != 1 or not isinstance(p.placements[0], Shard):
                raise ValueError(f"MGPP ranks DTensor candidates sharded on a 1-D device mesh "
                                 f"(fully_shard); got placements {p.placements} on a "
                                 f"{p.device_mesh.ndim}-D mesh: pass process_group= with the "
                                 f"group whose ranks hold disjoint shards")
            mesh_group = p.device_mesh.get_group()
            if group not in (None, mesh_group):
                raise ValueError("MGPP's DTensor candidates must share one device mesh")
            group = mesh_group
        return replace(sharding, group=group, by_mesh=True)

    def global_numel(self, local_candidates: list[torch.Tensor]) -> int:
        """N: the candidates' element count, summed over the group's shards."""
        numel = sum(p.numel() for p in local_candidates)
        if self.group is None:
            return numel
        total = torch.tensor([numel], dtype=torch.int64)
        torch.distributed.all_reduce(total, group=self.group)
        return int(total)
