"""MoMAForDistillation: a student, a key pathway, heads, batch attention and a key queue in one module.

Everything trainable sits in this one module so that Accelerate/DDP all-reduces the gradients of the student,
`g_S` and `A_q` together (the reference code leaves the heads outside DDP).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_distillation import FrozenKeyHead, MoMAConfig, TeacherUpdate
from .losses import batch_matching_loss, info_nce, kd_loss, labeled_cross_entropy
from .modeling_distillation import DistillationPreTrainedModel
from .modules.distributed import batch_statistics, gather_across_processes, shuffled_forward, world_size
from .modules.heads import BatchAttention, FixedProjection, ProjectionHead
from .modules.key_queue import KeyQueue
from .networks.backbones import backbone_tensors, feature_dim, pooled_features


@dataclass
class MoMAOutput(ModelOutput):
    """Output of `MoMAForDistillation.forward`.

    Attributes:
        loss: the weighted total, `()`.
        logits: the student's logits, `(B, C)`.
        loss_ce, loss_kd, loss_moma: the unweighted terms, `()` each (0 when a term is off).
        loss_key_head: with a learned frozen-teacher `g_T` only, the term that trains it, `()`.
        contrastive_keys: `(B, D)` keys of this batch, detached (not named `keys`, which would hide
            `dict.keys`); the trainer gathers them across processes and enqueues them after the optimiser step.
            None in eval mode.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss_ce: torch.Tensor | None = None
    loss_kd: torch.Tensor | None = None
    loss_moma: torch.Tensor | None = None
    loss_key_head: torch.Tensor | None = None
    contrastive_keys: torch.Tensor | None = None


class MoMAForDistillation(DistillationPreTrainedModel):
    """MoMA distillation of a teacher into a student image classifier.

    Args:
        config: the MoMA hyper-parameters, with the student's and teacher's own configs.
        student: a built (often pre-trained) image classifier; built from `config.student_config` when None.
        teacher: a built teacher (backbone or classifier); built from `config.teacher_config` when None.

    The query pathway is the student, `g_S` (`query_head`) and `A_q` (`query_attention`); the key pathway is the
    teacher, `g_T` (`key_head`) and `A_k` (`key_attention`). `A_k` is always the EMA of `A_q`; in "momentum"
    mode the teacher backbone and `g_T` are EMAs of the student backbone and `g_S` as well, while in "frozen" mode
    the teacher never changes and `g_T` is, by `frozen_key_head`, a `FixedProjection` fitted to the first
    micro-batch (gathered from every process) or a `ProjectionHead` trained by its own term, `loss_key_head`
    (`batch_matching_loss`: each key must pick its own sample's detached query out of the batch).
    """

    config_class = MoMAConfig
    loss_terms = ("loss_ce", "loss_kd", "loss_moma")

    def __init__(self, config: MoMAConfig, student: PreTrainedModel | None = None, teacher: nn.Module | None = None):
        super().__init__(config)
        config = self.config
        self._attach_networks(student, teacher)
        self.teacher_update = resolve_teacher_update(config.teacher_update, self.student, self.teacher)
        if config.shuffle_bn and self.teacher_update is not TeacherUpdate.MOMENTUM:
            raise ValueError(
                "shuffle_bn applies to momentum teachers only: a frozen teacher keeps its BatchNorm running "
                "statistics, so no batch statistics can leak. Drop --shuffle_bn or use a momentum teacher."
            )
        self.learns_key_head = (self.teacher_update is TeacherUpdate.FROZEN
                                and config.frozen_key_head is FrozenKeyHead.LEARNED)
        if config.frozen_key_head is FrozenKeyHead.LEARNED and not self.learns_key_head:
            raise ValueError(
                "frozen_key_head='learned' applies to frozen teachers only: a momentum teacher's g_T is the EMA of "
                "the student's g_S. Drop --frozen_key_head or use --teacher_update frozen."
            )
        dim, student_dim, teacher_dim = config.projection_dim, feature_dim(self.student), feature_dim(self.teacher)
        self.query_head = ProjectionHead(student_dim, dim)
        if self.teacher_update is TeacherUpdate.MOMENTUM:
            if teacher_dim != student_dim:
                raise ValueError(
                    f"A momentum teacher reads its feature as the student does, but this teacher's embedding has "
                    f"{teacher_dim} dims and the student's {student_dim} (a preset's embedding recipe, such as "
                    "cls+mean_patch, widens it). Use --teacher_update frozen."
                )
            self.key_head = ProjectionHead(teacher_dim, dim)
            self.key_head.load_state_dict(self.query_head.state_dict())
        elif self.learns_key_head:
            self.key_head = ProjectionHead(teacher_dim, dim)
            self.loss_terms = (*self.loss_terms, "loss_key_head")
        else:
            self.key_head = FixedProjection(teacher_dim, dim)
        attention = nn.Identity
        if config.use_attention:
            attention = lambda: BatchAttention(dim, config.num_attention_heads, config.attention_residual)  # noqa: E731
        self.query_attention, self.key_attention = attention(), attention()
        self.key_attention.load_state_dict(self.query_attention.state_dict())
        self.key_head.requires_grad_(self.learns_key_head)
        self.key_attention.requires_grad_(False)
        self.key_queue = KeyQueue(config.queue_size, dim)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_pixel_values: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        **kwargs,
    ) -> MoMAOutput:
        """Compute the student's logits and, in training, every MoMA loss term.

        Args:
            pixel_values: `(B, 3, H, W)` images normalised for the student.
            labels: `(B,)` class indices of the student's label space.
            teacher_pixel_values: `(B, 3, H, W)` the same crops normalised for the teacher; defaults to
                `pixel_values` when both share a normalisation.
            teacher_features, teacher_logits: `(B, d_t)` and `(B, C_t)` from a teacher-feature cache (frozen
                teachers only), which replace the teacher's forward.
        """
        if self.training:
            # Teacher first: its no-grad activations are freed before the student's forward, instead of
            # sitting on top of the student's saved activations (benchmarks/step_cost.py memory).
            if teacher_features is not None and self.teacher_update is not TeacherUpdate.FROZEN:
                raise ValueError("Cached teacher features need a frozen teacher: a momentum teacher changes every "
                                 "step. Use --teacher_update frozen or drop --cache_teacher_features.")
            keys, teacher_logits = self._keys(pixel_values, teacher_pixel_values, teacher_features, teacher_logits)
        features, logits = pooled_features(self.student, pixel_values)
        zero = logits.new_zeros((), dtype=torch.float32)
        loss_ce = labeled_cross_entropy(logits, labels) if labels is not None else zero
        if not self.training:
            # Only loss and logits, so the Trainer's prediction step hands compute_metrics the bare logits.
            return MoMAOutput(loss=self.config.w_ce * loss_ce, logits=logits)
        query = self.query_attention(self.query_head(features))
        temperature = self.config.contrastive_temperature
        loss_moma = info_nce(query, keys.detach(), self.key_queue.queue, temperature, self.key_queue.valid_mask())
        loss_kd = zero
        if self.config.w_kd > 0:
            loss_kd = kd_loss(logits, teacher_logits, self.config.kd_temperature)
        loss = self.config.w_ce * loss_ce + self.config.w_kd * loss_kd + self.config.w_moma * loss_moma
        loss_key_head = None
        if self.learns_key_head:
            loss_key_head = batch_matching_loss(keys, query.detach(), temperature)
            loss = loss + self.config.w_moma * loss_key_head
        return MoMAOutput(loss=loss, logits=logits, loss_ce=loss_ce, loss_kd=loss_kd, loss_moma=loss_moma,
                          loss_key_head=loss_key_head, contrastive_keys=keys.detach())

    def _keys(self, pixel_values, teacher_pixel_values, teacher_features, teacher_logits):
        """`k = A_k(g_T(h_t))`, `(B, D)`, and the teacher's logits `(B, C_t)` (None for a backbone teacher);
        the arguments are `forward`'s. Only a learned `g_T` takes a gradient, through `k`."""
        track_key_head = self.learns_key_head and torch.is_grad_enabled()
        with torch.no_grad():
            features, teacher_logits = self._teacher_features(pixel_values, teacher_pixel_values, teacher_features,
                                                              teacher_logits)
            if isinstance(self.key_head, FixedProjection) and not self.key_head.fitted:
                self.key_head.fit(gather_across_processes(features), seed=self.config.queue_size)
        with torch.set_grad_enabled(track_key_head):
            keys = self.key_attention(self.key_head(features.float()).to(features.dtype))
        return F.normalize(keys.float(), dim=-1), teacher_logits

    def _teacher_features(self, pixel_values, teacher_pixel_values, teacher_features, teacher_logits):
        """The teacher's pooled features `(B, d_t)` and logits, with Shuffle-BN when it is on."""
        if not self._shuffle_bn():
            return self.teacher_outputs(pixel_values, teacher_pixel_values, teacher_features, teacher_logits)
        with batch_statistics(self.teacher):
            return shuffled_forward(lambda x: pooled_features(self.teacher, x),
                                    pixel_values if teacher_pixel_values is None else teacher_pixel_values)

    def _shuffle_bn(self) -> bool:
        """Whether this training step runs the teacher with Shuffle-BN (needs several processes)."""
        if not (self.config.shuffle_bn and self.training):
            return False
        if world_size() == 1:
            if not getattr(self, "_warned_shuffle_bn", False):
                warnings.warn("shuffle_bn needs several processes; with one, the teacher keeps its running BN "
                              "statistics (the default behaviour).")
                self._warned_shuffle_bn = True
            return False
        return True

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The key-side tensors and the query-side tensors they track, in matching order.

        `A_k` tracks `A_q` always; in momentum mode the teacher backbone (parameters and floating-point buffers
        such as BN statistics) tracks the student backbone, and `g_T` tracks `g_S`. Built once and cached,
        since module walks have no place in the training step; `_apply` (`.to()`, `.float()`, ...) drops the
        cache because it may replace tensors, while loading weights copies into the same ones.
        """
        if getattr(self, "_ema_pairs", None) is None:
            key_modules, query_modules = [self.key_attention], [self.query_attention]
            keys, queries = [], []
            if self.teacher_update is TeacherUpdate.MOMENTUM:
                key_modules.append(self.key_head)
                query_modules.append(self.query_head)
                for buffers in (False, True):
                    keys += backbone_tensors(self.teacher, buffers)
                    queries += backbone_tensors(self.student, buffers)
            keys += [t for m in key_modules for t in m.parameters()]
            queries += [t for m in query_modules for t in m.parameters()]
            self._ema_pairs = (keys, queries)
        return self._ema_pairs

    def _apply(self, fn, *args, **kwargs):
        self._ema_pairs = None
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """`theta_key <- m * theta_key + (1 - m) * theta_query` for every key-side tensor, in one fused call."""
        keys, queries = self.ema_pairs()
        if keys:
            torch._foreach_lerp_(keys, queries, 1.0 - self.config.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Add `(N, D)` keys, already gathered from every process in rank order, to the queue."""
        self.key_queue.enqueue(keys)


def resolve_teacher_update(mode: str, student: nn.Module, teacher: nn.Module) -> TeacherUpdate:
    """Resolve "auto" to "momentum" when backbones and pooled features have identical shapes, else "frozen".

    Raises a ValueError when "momentum" is asked for two backbones that cannot track each other.
    """
    mode = TeacherUpdate(mode)
    twins = [tuple(t.shape) for t in backbone_tensors(student)] == [tuple(t.shape) for t in backbone_tensors(teacher)]
    if mode is TeacherUpdate.AUTO:
        same = twins and feature_dim(student) == feature_dim(teacher)
        return TeacherUpdate.MOMENTUM if same else TeacherUpdate.FROZEN
    # Twins whose features differ in width (a preset's recipe) are refused by MoMAForDistillation, naming the recipe.
    if mode is TeacherUpdate.MOMENTUM and not twins:
        raise ValueError(
            "teacher_update='momentum' needs a student with the teacher's architecture (the teacher becomes an EMA "
            "of the student), but their backbone parameters differ. Use student 'same-as-teacher', or "
            "teacher_update='frozen' for a cross-architecture teacher."
        )
    return mode
