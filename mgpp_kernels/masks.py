"""The packed keep masks of the frozen stage (docs/spec.md §2): one bit per element, element i is bit
i % 8 of byte i // 8, a set bit keeps the element. The kernels read and write this layout; the
sparse export stores its bitmasks the same way."""
from __future__ import annotations

import torch

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def packed_mask_bytes(numel: int) -> int:
    return (numel + 7) // 8


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A bool tensor as a uint8 tensor of packed_mask_bytes(keep.numel()) bytes."""
    bits = keep.flatten().to(torch.uint8)
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)]).view(-1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool mask of `like`'s shape that `packed` holds."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.flatten()[: like.numel()].view(like.shape).bool()
