"""A FIFO queue of past contrastive keys, kept as persistent buffers so checkpoints restore it exactly."""

from __future__ import annotations

import torch
from torch import nn


class KeyQueue(nn.Module):
    """K x D ring buffer of L2-normalised keys: the negatives of MoMA's InfoNCE term.

    Buffers: `queue` (K, D), `queue_ptr` (the next slot to write) and `queue_len` (how many slots hold real
    keys; slots not yet written are masked out of the loss instead of holding random vectors).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """K, the capacity of the queue."""
        return self.queue.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write `(N, D)` keys at the pointer, wrapping around; every process must pass the same gathered keys."""
        if keys.shape[0] > self.size:
            raise ValueError(
                f"Cannot enqueue {keys.shape[0]} keys into a queue of {self.size}: raise queue_size to at least "
                "the global batch size."
            )
        slots = (self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)) % self.size
        self.queue.index_copy_(0, slots, keys.detach().to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.size)
        self.queue_len.clamp_(max=self.size - keys.shape[0]).add_(keys.shape[0])

    @property
    def fill(self) -> float:
        """The share of slots that hold a real key, in [0, 1] (one host sync: call it when logging)."""
        return self.queue_len.item() / self.size

    def valid_mask(self) -> torch.Tensor:
        """`(K,)` bool, True for slots that hold a real key (no host sync, so it is safe in the training step)."""
        return torch.arange(self.size, device=self.queue.device) < self.queue_len
