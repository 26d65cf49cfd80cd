"""Load a teacher from the Hub or a local folder: transformers models, and timm models through TimmWrapper.

Pathology foundation models load by preset name (`uni2-h`, `virchow2`: see `preset_registry.py`), with the
constructor classes, normalization and embedding recipe their cards prescribe. Other teachers load by Hub id
(`owkin/phikon`, `timm/resnet18.a1_in1k`, `hf-hub:MahmoodLab/UNI`) or local path, at a pinned revision, with
the token from the usual huggingface_hub place (`HF_TOKEN` or `hf auth login`), and with `trust_remote_code`
off unless the caller asks for it. Weights load through `from_pretrained` (safetensors), and are named by
`weights_sha256` so that a checkpoint can name a frozen teacher instead of storing it. With `weights=False`
only the config and processor load: the network is built on the meta device (no memory), which is all a run
needs when a teacher-feature cache serves its outputs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import torch
from huggingface_hub import constants, get_token
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, PreTrainedModel

from ..configuration_distillation import TEACHER_DTYPES, parse_teacher_dtype
from ..data.transforms import normalization_from_processor
from .backbones import CLS_TOKEN_MODEL_TYPES, classifier_head, feature_dim, input_size
from .model_names import ModelLoadError, check_hub_model
from .teacher_presets import TeacherPreset, find_preset, instantiate, mark_preset, preset_model_args

logger = logging.getLogger(__name__)


class TeacherLoadError(ModelLoadError):
    """A teacher could not be loaded; the message says why and what to do."""


@dataclass
class Teacher:
    """A loaded teacher and the facts MoMA needs about it.

    Attributes:
        model: the network, in eval mode with gradients off (on the meta device, weightless, when loaded with
            `weights=False`).
        name_or_path, revision: where it came from.
        feature_dim: size of its pooled feature.
        mean, std: the normalisation it was trained with.
        input_size: its native square resolution.
        id2label: its classifier's labels, or None for a backbone.
        processor: its image processor, when it ships one.
        preset: the foundation-model preset it was loaded by, if any.
        weights_sha256: `weights_sha256(model)` of the loaded weights; None without weights.
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
    preset: TeacherPreset | None = None
    weights_sha256: str | None = None


def load_teacher(
    name_or_path: str,
    revision: str = "main",
    *,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    model_init_kwargs: dict | None = None,
    dtype: str = "float32",
    weights: bool = True,
) -> Teacher:
    """Load a teacher image model (backbone or classifier) and describe it.

    Args:
        name_or_path: a preset name (`uni2-h`, see `preset_registry.py`), Hub id, `hf-hub:` timm id, or local
            folder. A preset's Hub id gets the preset too.
        revision: branch, tag or commit sha to pin.
        token: Hub token; None uses the stored login or `HF_TOKEN`.
        trust_remote_code: allow the repo's own modelling code (off by default).
        model_init_kwargs: extra constructor kwargs, e.g. timm's `{"init_values": 1e-5}`.
        dtype: `float32`, `bfloat16` or `float16` weights.
        weights: False builds the network on the meta device from its config alone: its shapes, labels and
            feature size are known, its weights never read.
    """
    preset = None if os.path.isdir(name_or_path) else find_preset(name_or_path)
    repo = preset.hub_id if preset else name_or_path.removeprefix("hf-hub:")
    if preset is not None and preset.gated:
        check_gated_access(preset, token)
    hub = dict(revision=revision, token=token, trust_remote_code=trust_remote_code)
    # Missing folders, unreachable Hubs, gated or missing repos: a clear message now, before transformers wraps them.
    check_hub_model(repo, revision, token, "Teacher", "--teacher_model_revision", TeacherLoadError)
    config = AutoConfig.from_pretrained(repo, **hub)
    init_kwargs = {**(preset.init_kwargs if preset else {}), **(model_init_kwargs or {})}
    if preset is not None:
        mark_preset(config, preset)
    if config.model_type == "timm_wrapper":  # timm takes its constructor kwargs through the config
        model_args = preset_model_args(preset, config.model_args) if preset else config.model_args or {}
        config.model_args, init_kwargs = {**model_args, **init_kwargs}, {}
    elif config.model_type in CLS_TOKEN_MODEL_TYPES and not _is_classifier(config):
        # The feature is the CLS token; an unused dense+tanh pooler would only add parameters.
        init_kwargs.setdefault("add_pooling_layer", False)
    auto = AutoModelForImageClassification if _is_classifier(config) else AutoModel
    torch_dtype = TEACHER_DTYPES[parse_teacher_dtype(dtype)]
    if weights:
        model = instantiate(lambda cfg, **kw: auto.from_pretrained(repo, config=cfg, **kw), config,
                            dtype=torch_dtype, **hub, **init_kwargs)
    else:
        with torch.device("meta"):
            model = instantiate(auto.from_config, config, trust_remote_code=trust_remote_code, **init_kwargs)
        model.to(dtype=torch_dtype)
    model.eval().requires_grad_(False)
    processor = _load_processor(repo, hub)
    mean, std = normalization_from_processor(processor if processor is not None else config)
    head = classifier_head(model)
    return Teacher(
        model=model,
        name_or_path=name_or_path,
        revision=revision,
        feature_dim=_feature_dim(model, name_or_path),
        mean=list(preset.mean if preset else mean),
        std=list(preset.std if preset else std),
        input_size=preset.input_size if preset else input_size(model),
        id2label={int(k): v for k, v in model.config.id2label.items()} if head else None,
        processor=processor,
        preset=preset,
        weights_sha256=weights_sha256(model) if weights else None,
    )


def weights_sha256(model: nn.Module) -> str:
    """The SHA-256 of a network's weights: every state-dict entry's name, dtype, shape and bytes, in name order.

    It names a frozen teacher in a checkpoint; it reads every byte once (seconds for a 1B-parameter teacher).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def check_gated_access(preset: TeacherPreset, token: str | bool | None) -> None:
    """Fail before any request when a gated preset would be fetched with no token at all."""
    if token is False or (token is None and get_token() is None):
        raise TeacherLoadError(
            f"Teacher {preset.name} ({preset.hub_id}) is gated (licence {preset.license}): request access at "
            f"{constants.ENDPOINT}/{preset.hub_id}, then set HF_TOKEN to a read token of the account that was "
            "granted access (or run `hf auth login`), and run again."
        )


def _feature_dim(model, name_or_path: str) -> int:
    try:
        return feature_dim(model)
    except Exception as error:  # noqa: BLE001 - any failure here means the same thing to the user
        raise TeacherLoadError(
            f"Teacher {name_or_path!r} ({type(model).__name__}) gives no usable pooled feature: {error}. Use a "
            "vision backbone with a pooled output or CLS token (ViT, DINOv2, ResNet, ConvNeXt, Swin, "
            "EfficientNet, or a timm model)."
        ) from error


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
