"""BaselineForDistillation: the methods MoMA is compared with, on the same student, teacher, data and trainer.

`--method` picks one of `ce` (no teacher), `kd` (Hinton 2015), `dkd` (Zhao et al. 2022), `fitnet`
(Romero et al. 2015, on pooled features), `rkd` (Park et al. 2019) or `crd` (Tian et al. 2020, with a FIFO
memory). Every trainable part (student, projections) lives in this one module, as in MoMA, so DDP
all-reduces all of them; the teacher is frozen and runs in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_distillation import BaselineDistillationConfig, Method, TeacherUpdate
from .losses import crd_loss, dkd_loss, fitnet_loss, kd_loss, labeled_cross_entropy, rkd_loss
from .modeling_distillation import DistillationPreTrainedModel
from .modules.key_queue import KeyQueue
from .networks.backbones import feature_dim, pooled_features

_FEATURE_TERMS = {Method.FITNET: "loss_fitnet", Method.RKD: "loss_rkd", Method.CRD: "loss_crd"}


@dataclass
class DistillationOutput(ModelOutput):
    """Output of `BaselineForDistillation.forward`.

    Attributes:
        loss: the weighted total, `()`.
        logits: the student's logits, `(B, C)`.
        loss_ce, loss_kd, loss_dkd, loss_fitnet, loss_rkd, loss_crd: the unweighted terms, `()` each; only
            those of the model's `loss_terms` are set.
        contrastive_keys: `crd` only: `(B, 2D)` this batch's student and teacher embeddings, detached, which the
            trainer gathers and `enqueue` stores after the optimiser step.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss_ce: torch.Tensor | None = None
    loss_kd: torch.Tensor | None = None
    loss_dkd: torch.Tensor | None = None
    loss_fitnet: torch.Tensor | None = None
    loss_rkd: torch.Tensor | None = None
    loss_crd: torch.Tensor | None = None
    contrastive_keys: torch.Tensor | None = None


class BaselineForDistillation(DistillationPreTrainedModel):
    """A student trained with CE plus one baseline distillation term from a frozen teacher.

    Args:
        config: a `BaselineDistillationConfig` (method `ce`, `kd`, `dkd`, `fitnet`, `rkd` or `crd`; another
            method is refused, naming `MoMAForDistillation`). Used fields: `w_ce`; `w_kd` and
            `kd_temperature` (the `kd` term, or the `dkd` term that replaces it); `w_feature` (fitnet, rkd,
            crd); `projection_dim`, `queue_size`, `contrastive_temperature` (crd's embedding, memory, T).
        student: a built image classifier; built from `config.student_config` when None.
        teacher: a built teacher; None for `ce`, else built from `config.teacher_config` when None.
    """

    config_class = BaselineDistillationConfig

    def __init__(
        self, config: BaselineDistillationConfig, student: PreTrainedModel | None = None,
        teacher: nn.Module | None = None,
    ):
        super().__init__(config)
        config = self.config
        self._attach_networks(student, teacher, with_teacher=config.method.uses_teacher)
        # for the model card: the teacher never changes ("no" teacher for ce)
        self.teacher_update = TeacherUpdate.FROZEN if config.method.uses_teacher else "no"
        method, terms = config.method, ["loss_ce"]
        if config.w_kd > 0 and method.uses_teacher:  # any baseline with a teacher may add logit KD
            terms.append("loss_dkd" if method is Method.DKD else "loss_kd")
        if method in _FEATURE_TERMS:
            terms.append(_FEATURE_TERMS[method])
            student_dim, teacher_dim = feature_dim(self.student), feature_dim(self.teacher)
        if method is Method.FITNET:
            self.feature_projection = nn.Linear(student_dim, teacher_dim)
        if method is Method.CRD:
            dim = config.projection_dim
            self.student_embedding = nn.Linear(student_dim, dim)
            self.teacher_embedding = nn.Linear(teacher_dim, dim)
            self.student_memory = KeyQueue(config.queue_size, dim)
            self.teacher_memory = KeyQueue(config.queue_size, dim)
        self.loss_terms = tuple(terms)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_pixel_values: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        **kwargs,
    ) -> DistillationOutput:
        """The student's logits and, in training, the weighted loss and its terms.

        Args:
            pixel_values: `(B, 3, H, W)` images normalised for the student.
            labels: `(B,)` class indices of the student's label space.
            teacher_pixel_values: `(B, 3, H, W)` the same crops normalised for the teacher (default:
                `pixel_values`).
            teacher_features, teacher_logits: `(B, d_t)` and `(B, C_t)` from a teacher-feature cache, which
                replace the teacher's forward.
        """
        if self.training and self.config.method.uses_teacher:
            # Teacher first (or its cached outputs), so its activations are freed before the student's forward.
            teacher_features, teacher_logits = self.teacher_outputs(
                pixel_values, teacher_pixel_values, teacher_features, teacher_logits)
        features, logits = pooled_features(self.student, pixel_values)
        loss_ce = labeled_cross_entropy(logits, labels) if labels is not None else logits.new_zeros(())
        if not self.training:
            return DistillationOutput(loss=self.config.w_ce * loss_ce, logits=logits)
        config, keys = self.config, None
        terms, weights = {"loss_ce": loss_ce}, {"loss_ce": config.w_ce}
        if "loss_kd" in self.loss_terms:
            terms["loss_kd"], weights["loss_kd"] = kd_loss(logits, teacher_logits, config.kd_temperature), config.w_kd
        if "loss_dkd" in self.loss_terms:
            terms["loss_dkd"] = self._dkd_term(logits, teacher_logits, labels)
            weights["loss_dkd"] = config.w_kd
        if config.method in _FEATURE_TERMS:
            name = _FEATURE_TERMS[config.method]
            terms[name], keys = self._feature_term(features.float(), teacher_features.float())
            weights[name] = config.w_feature
        loss = sum(weights[name] * term for name, term in terms.items())
        return DistillationOutput(loss=loss, logits=logits, contrastive_keys=keys, **terms)

    def _dkd_term(self, logits, teacher_logits, labels) -> torch.Tensor:
        """DKD over the labeled examples (its target/non-target split needs the label); 0 when none is."""
        labeled = labels >= 0
        if not labeled.any():
            return logits.sum() * 0.0  # keeps every parameter in the graph for DDP
        return dkd_loss(logits[labeled], teacher_logits[labeled], labels[labeled],
                        temperature=self.config.kd_temperature)

    def _feature_term(self, features, teacher_features) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fitnet / rkd / crd term from pooled features `(B, d_s)` and `(B, d_t)`, and crd's keys `(B, 2D)`."""
        method = self.config.method
        if method is Method.FITNET:
            return fitnet_loss(self.feature_projection(features), teacher_features), None
        if method is Method.RKD:
            return rkd_loss(features, teacher_features), None
        student = F.normalize(self.student_embedding(features), dim=-1)
        teacher = F.normalize(self.teacher_embedding(teacher_features), dim=-1)
        loss = crd_loss(student, teacher, self.student_memory.queue, self.teacher_memory.queue,
                        self.config.contrastive_temperature, self.student_memory.valid_mask())
        return loss, torch.cat([student, teacher], dim=1).detach()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """crd: store the gathered `(N, 2D)` student and teacher embeddings in their memories."""
        if self.config.method is Method.CRD:
            student, teacher = keys.chunk(2, dim=1)
            self.student_memory.enqueue(student)
            self.teacher_memory.enqueue(teacher)

