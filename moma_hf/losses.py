"""Every loss term of this package as a plain function of tensors, so each can be checked by hand: MoMA's
(cross-entropy, logit KD, InfoNCE) and those of the baselines it is compared with (DKD, FitNets, RKD, CRD)."""

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
    # 1/T scales the (B, D) query, not the (B, K + 1) logits, and the mask is written into the fresh product in
    # place: two fewer passes over B x K values forward and backward (benchmarks/step_cost.py parts). The in-place
    # fill is safe for autograd: the product's backward needs its inputs, not its output.
    scaled = query / temperature
    positive = (scaled * key).sum(dim=-1, keepdim=True)
    negatives = scaled @ queue.to(query.dtype).T
    if queue_mask is not None:
        negatives.masked_fill_(~queue_mask, float("-inf"))
    logits = torch.cat([positive, negatives], dim=1)
    targets = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits.float(), targets)


def batch_matching_loss(anchors: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-batch InfoNCE: each anchor must pick its own sample's target out of the batch's targets.

    `CE(anchors @ targets.T / T, arange(B))`, averaged over the batch. It trains a learned frozen-teacher `g_T`
    (anchors: the keys; targets: the detached queries). Pulled toward its queries alone, through `info_nce`'s
    positive, `g_T` maps every patch to one point and the contrastive term sits at chance, `log(K + 1)`
    (measured in benchmarks/RESULTS.md, issue 18); here a key that matches every query is penalised.

    Args:
        anchors: `(B, D)` unit rows, with gradient.
        targets: `(B, D)` unit rows, without gradient.
        temperature: T.
    """
    logits = (anchors.float() @ targets.float().T) / temperature
    return F.cross_entropy(logits, torch.arange(len(anchors), device=anchors.device))


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


def labeled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labeled examples only; 0 (with a gradient path) when there are none.

    Args:
        logits: `(B, C)`.
        labels: `(B,)` class indices, -1 for an unlabeled example.
    """
    labeled = labels >= 0
    per_example = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    # No host sync: a batch without labels divides 0 by 1, and every parameter still gets a (zero) gradient,
    # which DDP needs when it does not search for unused parameters.
    return (per_example * labeled).sum() / labeled.sum().clamp(min=1)

def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022): `T^2 * (alpha * TCKD + beta * NCKD)`, batch mean.

    With `p = softmax(z / T)` and `y` the label of a sample:

    - TCKD = `KL(b_teacher || b_student)` on the binary distributions `b = [p_y, 1 - p_y]`;
    - NCKD = `KL(q_teacher || q_student)` with `q = softmax(z_{c != y} / T)`, the distribution over the `C - 1`
      non-target classes renormalised among themselves.

    Hinton's KD is `TCKD + (1 - p_y^teacher) * NCKD`; DKD frees the weight of NCKD from the teacher's confidence.
    The paper's defaults are alpha = 1, beta = 8, T = 4 (ImageNet used beta = 0.5, T = 1); its linear warm-up of
    the loss weight over the first epochs is the caller's to apply. Computed in float32; the teacher is detached.

    Args:
        student_logits: `(B, C)`, C >= 2.
        teacher_logits: `(B, C)`.
        labels: `(B,)` int64 target classes.
        alpha: weight of TCKD.
        beta: weight of NCKD.
        temperature: T.
    """
    z_student = student_logits.float() / temperature
    z_teacher = teacher_logits.detach().float() / temperature
    batch, classes = z_student.shape
    if classes < 2:
        raise ValueError(f"DKD needs at least 2 classes, got {classes}")
    is_target = F.one_hot(labels.long(), classes).bool()

    def split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Dropping the target column (rather than masking it with -inf) keeps every log-probability finite, so
        # the KL needs no 0 * log 0 special case. log(1 - p_y) comes from a logsumexp over the other classes,
        # which stays accurate when p_y is close to 1.
        others = z[~is_target].view(batch, classes - 1)
        log_all = torch.logsumexp(z, dim=-1)
        log_binary = torch.stack([z[is_target] - log_all, torch.logsumexp(others, dim=-1) - log_all], dim=-1)
        return log_binary, F.log_softmax(others, dim=-1)

    binary_student, others_student = split(z_student)
    binary_teacher, others_teacher = split(z_teacher)
    tckd = F.kl_div(binary_student, binary_teacher, reduction="batchmean", log_target=True)
    nckd = F.kl_div(others_student, others_teacher, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * temperature**2


def fitnet_loss(student_projected: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al., ICLR 2015) on pooled features: `mean((r(f_s) - f_t)^2)` over all elements.

    `r` is the caller's learned regressor (a Linear `d_s -> d_t`); the paper regresses intermediate feature maps
    with a convolution, here the hint is the pooled embedding. The teacher is detached; computed in float32.

    Args:
        student_projected: `(B, d_t)`, `r(f_s)`.
        teacher_features: `(B, d_t)`, `f_t`.
    """
    if student_projected.shape != teacher_features.shape:
        raise ValueError(
            f"FitNet hint needs equal shapes, got student {tuple(student_projected.shape)} "
            f"and teacher {tuple(teacher_features.shape)}"
        )
    return F.mse_loss(student_projected.float(), teacher_features.detach().float())


def _pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, B)` Euclidean distances `||x_i - x_j||` and the `(B, B)` Gram matrix of the centred rows.

    Both relations are translation invariant, so the rows are centred first: that shrinks the Gram entries and with
    them the cancellation in `G_ii + G_jj - 2 G_ij`. Distances below `sqrt(eps)` are set to exactly 0 through a
    `where`, since the gradient of `sqrt` is infinite at 0.
    """
    x = x - x.mean(dim=0, keepdim=True)
    gram = x @ x.T
    squared = gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram
    distances = torch.where(squared > eps, squared.clamp_min(eps).sqrt(), torch.zeros_like(squared))
    return distances, gram


def _rkd_relations(
    x: torch.Tensor, with_angles: bool, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean-normalised distances `(B, B)` and, if asked, the angle cosines `(B, B, B)` of one embedding set.

    `cos[i, j, k] = <x_i - x_j, x_k - x_j> / (d_ij d_kj) = (G_ik - G_ij - G_jk + G_jj) / (d_ij d_kj)`, the angle at
    vertex j, from the Gram matrix: `B^3` memory instead of the `B^2 D` of the explicit difference vectors. A
    degenerate side (two equal embeddings) gives cosine 0, as normalising a zero vector would.
    """
    batch = x.shape[0]
    distances, gram = _pairwise_distances(x.float(), eps)
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=x.device)
    mean = distances[off_diagonal].mean()
    normalised = distances / mean.clamp_min(eps)
    if not with_angles:
        return normalised, None
    diagonal = gram.diagonal()
    dot = gram[:, None, :] - gram[:, :, None] - gram[None, :, :] + diagonal[None, :, None]
    lengths = distances[:, :, None] * distances[None, :, :]
    cosines = torch.where(lengths > 0, dot / lengths.clamp_min(eps), torch.zeros_like(dot))
    return normalised, cosines


def rkd_loss(
    student_embed: torch.Tensor,
    teacher_embed: torch.Tensor,
    w_distance: float = 25.0,
    w_angle: float = 50.0,
) -> torch.Tensor:
    """Relational knowledge distillation (Park et al., CVPR 2019): `w_distance * L_dist + w_angle * L_angle`.

    With `d_ij = ||x_i - x_j||` and `mu` its mean over the `B (B - 1)` pairs `i != j`:

    - `L_dist = mean_{i != j} huber(d^s_ij / mu^s, d^t_ij / mu^t)`;
    - `L_angle = mean_{i, j, k distinct} huber(<e^s_ij, e^s_kj>, <e^t_ij, e^t_kj>)`, `e_ij = (x_i - x_j) / d_ij`;

    `huber` is smooth-L1 with threshold 1 (the paper's Huber loss, delta = 1). Only relations inside the batch are
    compared, so the embedding dims may differ. The paper's weights are 25 (distance) and 50 (angle); its code
    averages over all `B^2` pairs and `B^3` triples, degenerate ones included, where this averages over the
    distinct ones the paper's sums run over, which scales the terms by `B / (B - 1)` and `B^2 / ((B - 1)(B - 2))`.
    The teacher's relations are computed without gradient; float32.

    Args:
        student_embed: `(B, d_s)`.
        teacher_embed: `(B, d_t)`.
        w_distance: weight of the distance term (0 skips it).
        w_angle: weight of the angle term (0 skips it).

    Raises:
        ValueError: if B < 2, or B < 3 while `w_angle` is not 0.
    """
    batch = student_embed.shape[0]
    if teacher_embed.shape[0] != batch:
        raise ValueError(f"RKD needs one teacher row per student row, got {batch} and {teacher_embed.shape[0]}")
    if batch < 2:
        raise ValueError(f"RKD's distance term needs a batch of at least 2, got batch size {batch}")
    with_angles = w_angle != 0
    if with_angles and batch < 3:
        raise ValueError(f"RKD's angle term needs a batch of at least 3, got batch size {batch}")
    with torch.no_grad():
        distances_teacher, cosines_teacher = _rkd_relations(teacher_embed, with_angles)
    distances_student, cosines_student = _rkd_relations(student_embed, with_angles)

    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=student_embed.device)
    loss = w_distance * F.smooth_l1_loss(distances_student[off_diagonal], distances_teacher[off_diagonal], beta=1.0)
    if with_angles:
        # Masking by multiplication: gathering the distinct triples copies B^3 values and is several times slower.
        distinct = off_diagonal[:, :, None] & off_diagonal[:, None, :] & off_diagonal[None, :, :]
        per_triple = F.smooth_l1_loss(cosines_student, cosines_teacher, reduction="none", beta=1.0)
        loss = loss + w_angle * (per_triple * distinct).sum() / (batch * (batch - 1) * (batch - 2))
    return loss


def crd_loss(
    student_embed: torch.Tensor,
    teacher_embed: torch.Tensor,
    student_memory: torch.Tensor,
    teacher_memory: torch.Tensor,
    temperature: float = 0.07,
    memory_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contrastive representation distillation (Tian et al., ICLR 2020) with a FIFO memory, as two InfoNCE terms.

    `(info_nce(s, t, M_t) + info_nce(t, s, M_s)) / 2`: the student embedding of sample i must pick the teacher
    embedding of i among the teacher memory `M_t`, and the teacher embedding of i must pick the student embedding
    of i among the student memory `M_s` (the paper's two anchors). Neither positive is detached, so both embedding
    heads get gradient from both terms (CRD trains both heads; the caller freezes the teacher backbone).

    The paper keeps one momentum-updated memory slot per training sample, indexed by the sample's id, and scores
    with NCE. A streamed dataset has no sample indices, so the memory here is a FIFO queue of past embeddings (as
    in MoCo) and the score is InfoNCE, its softmax form. T = 0.07 is the paper's; it used 16384 negatives and
    128-d heads (Linear + L2 normalisation).

    Args:
        student_embed: `(B, D)` unit rows, with gradient.
        teacher_embed: `(B, D)` unit rows, with gradient.
        student_memory: `(K, D)` past student embeddings (detached here).
        teacher_memory: `(K, D)` past teacher embeddings (detached here).
        temperature: T.
        memory_mask: `(K,)` bool, False for slots not filled yet (excluded from both softmaxes).
    """
    student_to_teacher = info_nce(student_embed, teacher_embed, teacher_memory.detach(), temperature, memory_mask)
    teacher_to_student = info_nce(teacher_embed, student_embed, student_memory.detach(), temperature, memory_mask)
    return (student_to_teacher + teacher_to_student) / 2
