"""The small modules MoMA puts on top of the two backbones: projection heads and batch-axis attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """`g`: Linear(d, d), ReLU, Linear(d, D), then L2-normalise. Maps `(B, d)` features to `(B, D)` unit rows."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=-1)


class FixedProjection(nn.Module):
    """`g_T` for a frozen teacher: a fixed orthonormal map fitted once to teacher features, then never trained.

    Fitting keeps the teacher's geometry: features are centred with the mean of the first micro-batch (gathered
    from every process) and projected on an orthonormal basis whose first rows are that batch's principal
    directions, completed with seeded random orthonormal directions when the batch has fewer samples than dims.
    When `in_dim <= out_dim` the map is a rotation padded with zeros, so no information is lost. Keys therefore
    stay consistent for the whole run and the queue never goes stale. The basis is stored in buffers, so
    checkpoints restore it.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_dim, in_dim))
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, seed: int = 0) -> None:
        """Fit the map to `(N, in_dim)` teacher features (the same on every process)."""
        out_dim, in_dim = self.weight.shape
        features = features.float()
        mean = features.mean(0)
        _, _, vh = torch.linalg.svd(features - mean, full_matrices=False)
        rank = min(out_dim, in_dim)
        basis = vh[: min(rank, max(features.shape[0] - 1, 1))]
        if basis.shape[0] < rank:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            extra = torch.randn(rank - basis.shape[0], in_dim, generator=generator).to(basis)
            extra = extra - (extra @ basis.T) @ basis
            basis = torch.cat([basis, torch.linalg.qr(extra.T).Q.T])
        self.weight.zero_()
        self.weight[:rank] = basis
        self.mean.copy_(mean)
        self.fitted.fill_(True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`(B, in_dim)` features to `(B, out_dim)` unit rows."""
        return F.normalize((features.float() - self.mean) @ self.weight.T, dim=-1)


class BatchAttention(nn.Module):
    """`A`: multi-head self-attention over the batch axis, then L2-normalise.

    Each of the `B` embeddings attends over the others of its batch: the batch is treated as one sequence.
    Input and output are `(B, D)`; the output is re-normalised, which the reference code forgets.

    With `residual`, the output is `normalize(x + attention(x))`. Without it, a freshly initialised attention
    weighs the batch almost uniformly (unit-norm inputs give near-zero logits), so every sample's output is
    the same batch mean: measured cosine 1.000 between different samples' keys, and `A_k`, an EMA with
    m = 0.999, stays there for thousands of steps (`benchmarks/diagnose_attention.py`). The residual keeps each
    sample's own embedding and lets attention add batch context to it.
    """

    def __init__(self, dim: int, num_heads: int, residual: bool = True):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.residual = residual

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        sequence = embeddings.unsqueeze(0)
        attended = self.attention(sequence, sequence, sequence, need_weights=False)[0].squeeze(0)
        return F.normalize(embeddings + attended if self.residual else attended, dim=-1)
