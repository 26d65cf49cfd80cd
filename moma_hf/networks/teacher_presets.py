"""Pathology foundation models as teachers, by short name (`--teacher_model_name_or_path uni2-h`).

Each preset holds what its model card prescribes and a user would otherwise copy by hand: the Hub id and
library, the constructor arguments (classes such as timm's `SwiGLUPacked` included), the normalization, the
input size and magnification, the embedding recipe and its size, the parameter count, and whether the repo is
gated. The facts live in `preset_registry.py`, each entry beside its source.

A config never holds a class: a teacher's `config.json` stores the preset's name (`teacher_preset`), its
`model_args` stay plain JSON, and :func:`instantiate` puts the classes back whenever the network is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

import timm.layers
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, TimmWrapperConfig

# Constructor arguments that are Python objects, written in a preset by these names (timm's own spelling).
CONSTRUCTOR_CLASSES = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": nn.SiLU}
PRESET_ATTRIBUTE = "teacher_preset"  # the config attribute naming a network's preset
RECIPE_ATTRIBUTE = "embedding_recipe"  # the config attribute naming how features are read from its tokens


class EmbeddingRecipe(str, Enum):
    """How a backbone's output becomes the teacher feature `h_T`.

    - `pooled`: the model's own pooling (a classifier's head input, a backbone's pooled output or CLS token).
    - `cls`: the class token of the last, normalized hidden state.
    - `cls+mean_patch`: the class token concatenated with the mean of the patch tokens, class and register
      tokens excluded from the mean (Virchow's published embedding): twice the width.
    """

    POOLED = "pooled"
    CLS = "cls"
    CLS_MEAN_PATCH = "cls+mean_patch"


@dataclass(frozen=True)
class TeacherPreset:
    """One foundation model, as its card and paper describe it.

    Attributes:
        name: the short name users type (`uni2-h`).
        hub_id: its repo on the Hub.
        library: `timm` (loaded through transformers' TimmWrapper) or `transformers`.
        config: the published architecture as plain JSON: for timm `{"architecture": ..., "model_args": {...}}`,
            for transformers the config's fields with `model_type`. Builds the model offline (meta device) and
            fills what the repo's own config.json leaves out.
        constructor_classes: constructor arguments that are classes, by `CONSTRUCTOR_CLASSES` name.
        init_kwargs: plain constructor arguments of a transformers model (`add_pooling_layer`), as the card's
            own loading call passes them.
        mean, std: the normalization of its training (per RGB channel).
        input_size: native square input, in pixels.
        microns_per_pixel: the resolution it was trained at (0.5 = 20x).
        embedding: the recipe of its published embedding; embedding_dim its size.
        parameters: the published parameter count as written ("1.1B", "303M").
        gated: whether the Hub asks users to accept conditions before downloading.
        license: the repo's licence.
        source: where these facts come from.
        count_note: why the architecture's exact count falls outside the rounding of `parameters`, when it does
            (a published figure that is not the rounding of the built model's count).
    """

    name: str
    hub_id: str
    library: str
    config: dict
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding: EmbeddingRecipe
    embedding_dim: int
    parameters: str
    gated: bool
    license: str
    source: str
    constructor_classes: dict = field(default_factory=dict)
    init_kwargs: dict = field(default_factory=dict)
    input_size: int = 224
    microns_per_pixel: float = 0.5
    count_note: str = ""

    def __post_init__(self):
        if self.library not in ("timm", "transformers"):
            raise ValueError(f"preset {self.name}: library must be 'timm' or 'transformers', not {self.library!r}")
        unknown = set(self.constructor_classes.values()) - set(CONSTRUCTOR_CLASSES)
        if unknown:
            raise ValueError(f"preset {self.name}: unknown constructor classes {sorted(unknown)}")

    @property
    def parameter_range(self) -> tuple[int, int]:
        """The parameter counts the published figure rounds from: "1.1B" -> (1.05e9, 1.15e9)."""
        match = re.fullmatch(r"(\d+)(?:\.(\d+))?([MB])", self.parameters)
        if not match:
            raise ValueError(f"preset {self.name}: parameters {self.parameters!r} is not like '86M' or '1.1B'")
        whole, decimals, unit = match.groups()
        scale = {"M": 1e6, "B": 1e9}[unit]
        step = 10 ** -len(decimals or "")
        value = float(f"{whole}.{decimals or 0}")
        return round((value - step / 2) * scale), round((value + step / 2) * scale)

    def constructor_kwargs(self) -> dict:
        """The class-valued constructor arguments, resolved: `{"mlp_layer": SwiGLUPacked, ...}`."""
        return {key: CONSTRUCTOR_CLASSES[name] for key, name in self.constructor_classes.items()}

    def published_config(self) -> PretrainedConfig:
        """The transformers config of the published architecture, naming this preset (no download)."""
        if self.library == "timm":
            config = TimmWrapperConfig(architecture=self.config["architecture"],
                                       model_args=dict(self.config.get("model_args", {})))
        else:
            fields = dict(self.config)
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        mark_preset(config, self)
        return config


def mark_preset(config: PretrainedConfig, preset: TeacherPreset) -> None:
    """Record the preset and its embedding recipe on a network's config (both plain strings)."""
    setattr(config, PRESET_ATTRIBUTE, preset.name)
    setattr(config, RECIPE_ATTRIBUTE, preset.embedding.value)


def preset_of(config: PretrainedConfig) -> TeacherPreset | None:
    """The preset a network's config names, or None."""
    name = getattr(config, PRESET_ATTRIBUTE, None)
    return find_preset(name) if name else None


def find_preset(name_or_path: str | None) -> TeacherPreset | None:
    """The preset called `name_or_path` (short name or Hub id, any case, with or without timm's `hf-hub:`), or
    None."""
    from .preset_registry import PRESETS  # the registry imports this module for its classes

    if not name_or_path:
        return None
    key = name_or_path.removeprefix("hf-hub:").removeprefix("hf_hub:").lower()  # timm takes both spellings
    return next((p for p in PRESETS.values() if key in (p.name.lower(), p.hub_id.lower())), None)


def instantiate(build, config: PretrainedConfig, **kwargs) -> nn.Module:
    """`build(config, **kwargs)` (a `from_config` or `from_pretrained`) with the preset's classes put back into a
    timm config's `model_args` for the construction only, so the model's config stays plain JSON."""
    preset = preset_of(config)
    if preset is None or not preset.constructor_classes or not isinstance(config, TimmWrapperConfig):
        return build(config, **kwargs)
    plain = dict(config.model_args or {})
    config.model_args = {**plain, **preset.constructor_kwargs()}
    try:
        model = build(config, **kwargs)
    finally:
        config.model_args = plain
    model.config.model_args = plain
    return model


def preset_model_args(preset: TeacherPreset, repo_args: dict | None) -> dict:
    """A timm teacher's JSON `model_args`: the preset's published ones, overridden by what the repo's own
    config.json states (the repo is the authority on its weights), never `num_classes` (the wrapper sets it)."""
    merged = {**preset.config.get("model_args", {}), **(repo_args or {})}
    merged.pop("num_classes", None)
    return merged


def parameter_count(model: nn.Module) -> int:
    """Number of parameters, meta tensors included."""
    return sum(p.numel() for p in model.parameters())


def build_on_meta(preset: TeacherPreset) -> nn.Module:
    """The published architecture with no memory and no weights (tensors on the meta device)."""
    from transformers import AutoModel

    with torch.device("meta"):
        return instantiate(AutoModel.from_config, preset.published_config(), **preset.init_kwargs)
