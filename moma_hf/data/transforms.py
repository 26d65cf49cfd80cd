"""Histology-aware image transforms for MoMA distillation.

Every transform here maps a PIL RGB image to a float32 tensor of shape ``(3, H, W)`` with values in
``[0, 1]``. They do **not** normalise: the student and the teacher may expect different mean/std, so
:class:`moma_hf.data.loading.PatchCollator` normalises the same augmented crop once per model.

Train pipeline (torchvision ``transforms.v2`` and timm, nothing re-implemented that they provide):

1. ``RandomResizedCrop(image_size, scale)``; an image smaller than the crop is upsampled.
2. Horizontal and vertical flips and a random multiple of 90 degrees: tissue has no "up".
3. timm RandAugment (default ``rand-n2-m10-mstd0.5``, the paper's setting), applied on the PIL image.
4. Conversion to a float tensor in ``[0, 1]``.
5. :class:`HEDJitter`, a stain perturbation in haematoxylin-eosin-DAB space (Tellez et al., 2018).

Eval pipeline: resize the shorter side to ``floor(image_size / crop_pct)``, then centre-crop to
``image_size`` (timm's convention).

:func:`load_rgb_image` turns what a dataset stores (bytes, a path, a PIL image of any mode) into the RGB
PIL image these transforms take.
"""
from __future__ import annotations

import io
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "HEDJitter",
    "build_train_transform",
    "build_eval_transform",
    "load_rgb_image",
    "normalization_from_processor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Ruifrok & Johnston (2001) optical-density vectors of haematoxylin, eosin and DAB, one per row
# (RGB columns); the same published values that scikit-image's ``rgb_from_hed`` uses.
_RUIFROK_JOHNSTON = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)
# The fill of RandAugment's geometric ops. Empty glass is white in H&E slides, so white reads as
# background, where timm's default (the ImageNet mean, a dark grey) would be an artefact.
_WHITE_FILL = (255, 255, 255)


class HEDJitter(torch.nn.Module):
    """Random stain jitter in haematoxylin-eosin-DAB (HED) space (Tellez et al., 2018).

    The image is converted to optical density ``OD = -ln(I)`` and unmixed into H, E and DAB
    concentrations with the Ruifrok-Johnston stain matrix. Each concentration channel ``c`` of each
    image becomes ``alpha_c * c + beta_c`` with ``alpha_c ~ U(1 - sigma, 1 + sigma)`` and
    ``beta_c ~ U(-sigma, sigma)``, and the result is mixed back to RGB and clamped to ``[0, 1]``.
    Concentrations are in natural-log optical-density units (stain vectors normalised to unit length),
    not scikit-image's rescaled units, so the same ``sigma`` is a milder change than there:
    ``0.05`` is a light jitter and ``0.2`` a strong one. ``sigma=0`` is the identity.

    Args:
        sigma: jitter strength, ``>= 0``.
        eps: the smallest intensity before the logarithm (a black pixel has infinite density).

    Shapes:
        input ``(3, H, W)`` or ``(B, 3, H, W)`` float in ``[0, 1]``; output the same shape and dtype.
        Each image of a batch draws its own ``alpha`` and ``beta``.
    """

    def __init__(self, sigma: float = 0.05, eps: float = 1e-6):
        super().__init__()
        if sigma < 0:
            raise ValueError(f"HEDJitter sigma must be >= 0, got {sigma}.")
        self.sigma = float(sigma)
        self.eps = float(eps)
        stains = torch.tensor(_RUIFROK_JOHNSTON, dtype=torch.float64)
        stains = stains / stains.norm(dim=1, keepdim=True)
        # Inverted in float64 once, so the RGB -> HED -> RGB round trip is exact to float32 precision.
        self.register_buffer("hed_to_od", stains.float(), persistent=False)
        self.register_buffer("od_to_hed", torch.linalg.inv(stains).float(), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Jitter ``image`` (``(3, H, W)`` or ``(B, 3, H, W)``, float in ``[0, 1]``); same shape back."""
        batched = image.dim() == 4
        x = image if batched else image.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"HEDJitter expects (3, H, W) or (B, 3, H, W) RGB tensors, got {tuple(image.shape)}.")
        n = x.shape[0]
        alpha = 1.0 + (torch.rand(n, 3, 1, 1, device=x.device) * 2.0 - 1.0) * self.sigma
        beta = (torch.rand(n, 3, 1, 1, device=x.device) * 2.0 - 1.0) * self.sigma
        od = -torch.log(x.float().clamp_min(self.eps))
        hed = torch.einsum("bchw,cs->bshw", od, self.od_to_hed.to(x.device))
        hed = hed * alpha + beta
        od = torch.einsum("bshw,sc->bchw", hed, self.hed_to_od.to(x.device))
        out = torch.exp(-od).clamp_(0.0, 1.0).to(image.dtype)
        return out if batched else out.squeeze(0)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


def _to_float_tensor() -> list[Callable]:
    """PIL image -> float32 tensor ``(3, H, W)`` in ``[0, 1]``."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def build_train_transform(
    image_size: int,
    *,
    randaugment: str | None = "rand-n2-m10-mstd0.5",
    stain_jitter: float = 0.05,
    scale: Sequence[float] = (0.5, 1.0),
) -> Callable[[Image.Image], torch.Tensor]:
    """The training augmentation: PIL RGB image -> float32 tensor ``(3, image_size, image_size)`` in ``[0, 1]``.

    Args:
        image_size: side of the square model input.
        randaugment: a timm RandAugment string (``rand-n2-m10-mstd0.5`` is the paper's), or ``None``/``""``
            to turn it off.
        stain_jitter: :class:`HEDJitter` strength; ``0`` turns it off.
        scale: area range of :class:`torchvision.transforms.v2.RandomResizedCrop`.
    """
    from timm.data.auto_augment import rand_augment_transform

    ops: list[Callable] = [
        v2.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        # On a square crop, rotations by multiples of 90 degrees only permute pixels.
        v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]),
    ]
    if randaugment:
        hparams = {"translate_const": int(image_size * 0.45), "img_mean": _WHITE_FILL}
        ops.append(rand_augment_transform(randaugment, hparams))
    ops.extend(_to_float_tensor())
    if stain_jitter > 0:
        ops.append(HEDJitter(stain_jitter))
    return v2.Compose(ops)


def build_eval_transform(image_size: int, *, crop_pct: float = 1.0) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform: PIL RGB image -> float32 tensor ``(3, image_size, image_size)`` in ``[0, 1]``.

    Resizes the shorter side to ``floor(image_size / crop_pct)`` (bicubic, antialiased), then centre-crops
    ``image_size``, as timm does. ``crop_pct=1`` (the default) keeps the whole patch, which suits tiles
    that were cut at the model's field of view.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    scale_size = math.floor(image_size / crop_pct)
    return v2.Compose(
        [
            v2.Resize(scale_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *_to_float_tensor(),
        ]
    )


def _mean_std_from_mapping(cfg: Mapping[str, Any]) -> tuple[Any, Any] | None:
    for mean_key, std_key in (("mean", "std"), ("image_mean", "image_std")):
        if cfg.get(mean_key) is not None and cfg.get(std_key) is not None:
            return cfg[mean_key], cfg[std_key]
    return None


def _find_mean_std(obj: Any, depth: int = 0) -> tuple[Any, Any] | None:
    if obj is None or depth > 3:
        return None
    if isinstance(obj, Mapping):
        found = _mean_std_from_mapping(obj)
        return found or _find_mean_std(obj.get("pretrained_cfg"), depth + 1)
    for mean_attr, std_attr in (("image_mean", "image_std"), ("mean", "std")):
        mean, std = getattr(obj, mean_attr, None), getattr(obj, std_attr, None)
        if mean is not None and std is not None and not callable(mean):
            return mean, std
    # A processor wrapping an image processor, a TimmWrapperConfig, a timm model or a transformers model.
    for attr in ("image_processor", "pretrained_cfg", "config"):
        found = _find_mean_std(getattr(obj, attr, None), depth + 1)
        if found:
            return found
    return None


def _as_rgb_list(values: Any, name: str) -> list[float]:
    try:
        values = [float(v) for v in values]
    except TypeError:  # a scalar
        values = [float(values)]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"Expected 3 {name} values (RGB), got {values}.")
    return values


def normalization_from_processor(processor_or_pretrained_cfg: Any) -> tuple[list[float], list[float]]:
    """Read a model's input normalisation as ``(mean, std)``, each a list of 3 floats (RGB).

    Accepts a transformers image processor or processor (``image_mean``/``image_std``), a timm
    ``pretrained_cfg`` or data config (a dict, or timm's ``PretrainedCfg``, with ``mean``/``std``), a
    ``TimmWrapperConfig`` (its ``pretrained_cfg``), a timm model (its ``pretrained_cfg``) or a
    transformers model whose config is one of these. Returns the ImageNet mean/std when none is found
    (including for ``None``). A single value (grayscale models) is repeated for the 3 channels.
    """
    found = _find_mean_std(processor_or_pretrained_cfg)
    if found is None:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return _as_rgb_list(found[0], "mean"), _as_rgb_list(found[1], "std")


def _open_image(image: Any) -> Image.Image:
    """Open (lazily) a PIL image from a datasets ``{"bytes", "path"}`` dict, bytes, a path or a PIL image."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            return Image.open(io.BytesIO(image["bytes"]))
        image = image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    if isinstance(image, (str, os.PathLike)):
        if "://" in str(image):  # a remote file of a streamed Hub image folder
            from datasets.utils.file_utils import xopen

            with xopen(str(image), "rb") as handle:
                return Image.open(io.BytesIO(handle.read()))
        with open(image, "rb") as handle:  # read whole, so a corrupt file leaves no open handle behind
            return Image.open(io.BytesIO(handle.read()))
    raise ValueError(f"Cannot read an image from {type(image).__name__}: expected bytes, a path or a PIL image.")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit/int/float scaled to 8 bits, alpha composited on white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))  # white, the colour of empty glass
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb_image(image: Any) -> Image.Image:
    """Decode one image fully into an RGB PIL image.

    ``image`` is a ``{"bytes", "path"}`` dict (``datasets.Image(decode=False)``), raw bytes, a path or a PIL
    image. Grayscale, 16-bit, palette and CMYK images are converted; an alpha channel is composited on
    white. Raises whatever PIL raises for a corrupt or truncated file.
    """
    image = _open_image(image)
    image.load()  # decode now, so truncation fails here and not in a transform
    return _to_rgb(image)
