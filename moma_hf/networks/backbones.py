"""Pooled features (and logits) from any transformers vision model, timm-wrapped models included.

MoMA needs, from one forward pass, the pooled feature `h` of a network and, for a classifier, its logits `z`.
A classifier's feature is whatever its classification head receives, captured with a forward pre-hook on the
head, so the model's own pooling and norms are used unchanged. A headless backbone gives its pooled output.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .teacher_presets import RECIPE_ATTRIBUTE, EmbeddingRecipe

# Backbones whose `pooler_output` is a trained-or-not dense+tanh layer rather than a pooling: their feature is
# the normalised CLS token (as Phikon and other ViT pathology models document).
CLS_TOKEN_MODEL_TYPES = frozenset({"vit", "deit", "vit_msn", "vit_mae", "beit", "data2vec-vision"})


def head_module(model: nn.Module) -> nn.Module | None:
    """The classification head of an image classifier, or None for a backbone (cheap: called every step).

    transformers image classifiers (ViT, DINOv2, ResNet, ConvNeXt, Swin, EfficientNet, ...) call it
    `classifier`; a `TimmWrapperForImageClassification` keeps it inside the timm model.
    """
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None:
        return timm_model.get_classifier() if getattr(timm_model, "num_classes", 0) else None
    head = getattr(model, "classifier", None)
    return head if isinstance(head, nn.Module) else None


def classifier_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The classification head as `(qualified name, module)`, or None for a backbone."""
    head = head_module(model)
    if head is None:
        return None
    return next(n for n, m in model.named_modules() if m is head), head


def backbone_tensors(model: nn.Module, buffers: bool = False) -> list[torch.Tensor]:
    """Parameters (or floating-point buffers) of `model` outside its classification head, in module order.

    These are the tensors that the momentum teacher tracks as an EMA of the student.
    """
    head = classifier_head(model)
    prefix = head[0] + "." if head else None
    named = model.named_buffers() if buffers else model.named_parameters()
    return [
        t
        for n, t in named
        if (prefix is None or not n.startswith(prefix)) and (not buffers or t.is_floating_point())
    ]


@contextmanager
def _capture_head_input(head: nn.Module, store: dict):
    def hook(_module, args):
        store["features"] = args[0]

    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def pooled_features(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward pass of `model` giving its pooled feature and, for a classifier, its logits.

    Args:
        model: a transformers image classifier or backbone (TimmWrapper models included).
        pixel_values: `(B, 3, H, W)` normalised images.

    Returns:
        `(features (B, d), logits (B, C) or None)`.
    """
    head = head_module(model)
    if head is not None:
        store: dict = {}
        with _capture_head_input(head, store):
            logits = model(pixel_values=pixel_values).logits
        return store["features"].flatten(1), logits
    outputs = model(pixel_values=pixel_values)
    recipe = getattr(model.config, RECIPE_ATTRIBUTE, None) or EmbeddingRecipe.POOLED
    if recipe != EmbeddingRecipe.POOLED:
        return embedding_from_tokens(outputs.last_hidden_state, recipe, num_prefix_tokens(model)), None
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None or getattr(model.config, "model_type", None) in CLS_TOKEN_MODEL_TYPES:
        hidden = outputs.last_hidden_state
        pooled = hidden[:, 0] if hidden.ndim == 3 else hidden.mean(dim=(2, 3))
    return pooled.flatten(1), None


def embedding_from_tokens(tokens: torch.Tensor, recipe: str, prefix_tokens: int) -> torch.Tensor:
    """A backbone's embedding from its last hidden state by `recipe` (see `EmbeddingRecipe`).

    Args:
        tokens: `(B, N, d)` normalized tokens, the class token first, then `prefix_tokens - 1` registers.
        recipe: `cls` gives `(B, d)`; `cls+mean_patch` gives `(B, 2d)`, the class token then the mean of the
            `N - prefix_tokens` patch tokens.
    """
    recipe = EmbeddingRecipe(recipe)
    if recipe == EmbeddingRecipe.CLS:
        return tokens[:, 0]
    if recipe == EmbeddingRecipe.CLS_MEAN_PATCH:
        return torch.cat([tokens[:, 0], tokens[:, prefix_tokens:].mean(dim=1)], dim=-1)
    raise ValueError(f"embedding recipe {recipe.value!r} is not read from tokens")


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens in a ViT's output: the class token plus any registers."""
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None:
        return int(getattr(timm_model, "num_prefix_tokens", 1))
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


def input_size(model: nn.Module, default: int = 224) -> int:
    """The square input resolution a model was configured or pre-trained for (pixels)."""
    config = model.config
    timm_cfg = getattr(config, "pretrained_cfg", None) or {}
    if timm_cfg.get("input_size"):
        return int(timm_cfg["input_size"][-1])
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[-1]
    return int(size) if size else default


@torch.no_grad()
def feature_dim(model: nn.Module) -> int:
    """The size `d` of `pooled_features(model, x)[0]`, found with one small forward pass."""
    head = classifier_head(model)
    if head is not None:
        linear = head[1] if isinstance(head[1], nn.Linear) else next(
            (m for m in head[1].modules() if isinstance(m, nn.Linear)), None
        )
        if linear is not None:
            return linear.in_features
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    size = input_size(model)
    probe = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
    dim = pooled_features(model, probe)[0].shape[-1]
    model.train(was_training)
    return dim
