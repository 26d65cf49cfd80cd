"""Collectives MoMA needs beyond gradient all-reduce: gathering features, and MoCo's Shuffle-BN.

Every function is a no-op passthrough when torch.distributed is not initialised or has one process.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """All processes' `(B, ...)` tensors concatenated in rank order, `(world * B, ...)`; no gradient."""
    if world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def global_permutation(n: int, device: torch.device) -> torch.Tensor:
    """A random permutation of `range(n)` drawn on rank 0 and shared with every process, `(n,)` int64."""
    permutation = torch.randperm(n, device=device)
    dist.broadcast(permutation, src=0)
    return permutation


@contextmanager
def batch_statistics(module: nn.Module):
    """Run `module`'s BatchNorm layers on batch statistics (train mode) inside the block, then restore."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    for m in norms:
        m.train()
    try:
        yield
    finally:
        for m, mode in zip(norms, modes):
            m.train(mode)


def shuffled_forward(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], inputs: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """Shuffle-BN: run `forward` on a random shard of the global batch, then return this process's outputs.

    The reference MoCo trick against BatchNorm "cheating": when a key's BN statistics come from the very
    samples its query sees, the contrastive task can be solved from the statistics alone. Here the global batch
    is gathered, permuted with a permutation shared by all processes, each process runs `forward` on its slice
    of the permuted batch, and the outputs are gathered and un-permuted, so each process receives the outputs
    of its own samples, computed with the statistics of other samples. Inference only (no gradient).

    Args:
        forward: `(B, ...) -> tuple` of `(B, ...)` tensors or None (e.g. features and logits).
        inputs: `(B, ...)` this process's inputs; every process must pass the same B.
    Returns:
        `forward`'s outputs for `inputs`, in `inputs`' order.
    """
    world = world_size()
    if world == 1:
        return forward(inputs)
    rank, batch = dist.get_rank(), inputs.shape[0]
    everything = gather_across_processes(inputs)
    permutation = global_permutation(everything.shape[0], inputs.device)
    mine = slice(rank * batch, (rank + 1) * batch)
    outputs = forward(everything[permutation[mine]])
    inverse = torch.argsort(permutation)
    return tuple(None if out is None else gather_across_processes(out)[inverse][mine] for out in outputs)
