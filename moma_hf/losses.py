"""Distillation loss terms, written as plain functions of tensors so each can be checked by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    queue_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo-style InfoNCE: each query's positive is its own key, the negatives are the queued keys.

    `CE([q.k, q.queue_1 .. q.queue_K] / T, target 0)`, averaged over the batch.

    Args:
        query: `(B, D)` unit rows, with gradient.
        key: `(B, D)` unit rows, without gradient.
        queue: `(K, D)` past keys.
        temperature: T.
        queue_mask: `(K,)` bool, False for queue slots that hold no key yet (excluded from the softmax).
    """
    positive = (query * key).sum(dim=-1, keepdim=True)
    negatives = query @ queue.to(query.dtype).T
    if queue_mask is not None:
        negatives = negatives.masked_fill(~queue_mask, float("-inf"))
    logits = torch.cat([positive, negatives], dim=1) / temperature
    targets = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits.float(), targets)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's logit distillation: `T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`, batch mean.

    Args:
        student_logits: `(B, C)`.
        teacher_logits: `(B, C)`, without gradient.
        temperature: T_kd.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled examples only; 0 (with a gradient path) when there are none.

    Args:
        logits: `(B, C)`.
        labels: `(B,)` class indices, -1 for an unlabelled example.
    """
    labelled = labels >= 0
    per_example = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    # No host sync: a batch without labels divides 0 by 1, and every parameter still gets a (zero) gradient,
    # which DDP needs when it does not search for unused parameters.
    return (per_example * labelled).sum() / labelled.sum().clamp(min=1)
