"""Load a teacher from the Hub or a local folder: transformers models, and timm models through TimmWrapper.

Teachers load by Hub id (`owkin/phikon`, `timm/resnet18.a1_in1k`, `hf-hub:MahmoodLab/UNI`) or local path, at a
pinned revision, with the token from the usual huggingface_hub place (`HF_TOKEN` or `hf auth login`), and with
`trust_remote_code` off unless the caller asks for it. Weights load through `from_pretrained` (safetensors).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, PreTrainedModel

from ..data.transforms import normalization_from_processor
from .backbones import CLS_TOKEN_MODEL_TYPES, classifier_head, feature_dim, input_size
from .model_names import ModelLoadError, check_hub_model

logger = logging.getLogger(__name__)


class TeacherLoadError(ModelLoadError):
    """A teacher could not be loaded; the message says why and what to do."""


@dataclass
class Teacher:
    """A loaded teacher and the facts MoMA needs about it.

    Attributes:
        model: the network, in eval mode with gradients off.
        name_or_path, revision: where it came from.
        feature_dim: size of its pooled feature.
        mean, std: the normalisation it was trained with.
        input_size: its native square resolution.
        id2label: its classifier's labels, or None for a backbone.
        processor: its image processor, when it ships one.
    """

    model: PreTrainedModel
    name_or_path: str
    revision: str
    feature_dim: int
    mean: list[float]
    std: list[float]
    input_size: int
    id2label: dict[int, str] | None
    processor: object | None = None


def load_teacher(
    name_or_path: str,
    revision: str = "main",
    *,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    model_init_kwargs: dict | None = None,
) -> Teacher:
    """Load a teacher image model (backbone or classifier) and describe it.

    Args:
        name_or_path: Hub id, `hf-hub:` timm id, or local folder.
        revision: branch, tag or commit sha to pin.
        token: Hub token; None uses the stored login or `HF_TOKEN`.
        trust_remote_code: allow the repo's own modelling code (off by default).
        model_init_kwargs: extra constructor kwargs, e.g. timm's `{"init_values": 1e-5}` for UNI/H-optimus.
    """
    repo = name_or_path.removeprefix("hf-hub:")
    hub = dict(revision=revision, token=token, trust_remote_code=trust_remote_code)
    # Missing folders, unreachable Hubs, gated or missing repos: a clear message now, before transformers wraps them.
    check_hub_model(repo, revision, token, "Teacher", "--teacher_model_revision", TeacherLoadError)
    config = AutoConfig.from_pretrained(repo, **hub)
    init_kwargs = dict(model_init_kwargs or {})
    if config.model_type == "timm_wrapper":
        config.model_args = {**(config.model_args or {}), **init_kwargs}
        init_kwargs = {}
    elif config.model_type in CLS_TOKEN_MODEL_TYPES and not _is_classifier(config):
        # The feature is the CLS token; an unused dense+tanh pooler would only add parameters.
        init_kwargs.setdefault("add_pooling_layer", False)
    auto = AutoModelForImageClassification if _is_classifier(config) else AutoModel
    model = auto.from_pretrained(repo, config=config, dtype=torch.float32, **hub, **init_kwargs)
    model.eval().requires_grad_(False)
    try:
        dim = feature_dim(model)
    except Exception as error:  # noqa: BLE001 - any failure here means the same thing to the user
        raise TeacherLoadError(
            f"Teacher {name_or_path!r} ({type(model).__name__}) gives no usable pooled feature: {error}. Use a "
            "vision backbone with a pooled output or CLS token (ViT, DINOv2, ResNet, ConvNeXt, Swin, "
            "EfficientNet, or a timm model)."
        ) from error
    processor = _load_processor(repo, hub)
    mean, std = normalization_from_processor(processor if processor is not None else config)
    head = classifier_head(model)
    return Teacher(
        model=model,
        name_or_path=name_or_path,
        revision=revision,
        feature_dim=dim,
        mean=list(mean),
        std=list(std),
        input_size=input_size(model),
        id2label={int(k): v for k, v in model.config.id2label.items()} if head else None,
        processor=processor,
    )


def _is_classifier(config) -> bool:
    if config.model_type == "timm_wrapper":
        return bool(config.num_labels)
    return any(arch.endswith("ForImageClassification") for arch in (config.architectures or []))


def _load_processor(repo: str, hub: dict):
    try:
        return AutoImageProcessor.from_pretrained(repo, **hub)
    except (OSError, ValueError) as error:
        logger.warning("No image processor found for %s (%s); using the config's normalisation.", repo, error)
        return None
