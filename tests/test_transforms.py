"""Tests for moma_hf.data.transforms on real H&E patches."""
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from moma_hf.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    HEDJitter,
    build_eval_transform,
    build_train_transform,
    normalization_from_processor,
)


@pytest.fixture(scope="module")
def patches(nct_mini_dir):
    """Four real 224x224 patches of different tissues, as RGB PIL images."""
    files = [sorted((nct_mini_dir / tissue).glob("*.jpg"))[0] for tissue in ("LYM", "TUM", "STR", "ADI")]
    return [Image.open(f).convert("RGB") for f in files]


def _as_float(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image).float() / 255.0


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[..., 0, :, :] + 0.587 * x[..., 1, :, :] + 0.114 * x[..., 2, :, :]).flatten(-2)


def test_hed_jitter_zero_strength_is_identity(patches):
    batch = torch.stack([_as_float(p) for p in patches])
    assert torch.allclose(HEDJitter(0.0)(batch), batch, atol=1e-5)
    assert torch.allclose(HEDJitter(0.0)(batch[0]), batch[0], atol=1e-5)


def test_hed_jitter_changes_colour_but_keeps_structure(patches):
    torch.manual_seed(0)
    batch = torch.stack([_as_float(p) for p in patches])
    jittered = HEDJitter(0.2)(batch)
    assert jittered.shape == batch.shape and jittered.dtype == batch.dtype
    assert 0.0 <= jittered.min() and jittered.max() <= 1.0
    colour_shift = (jittered.mean(dim=(2, 3)) - batch.mean(dim=(2, 3))).abs().amax(dim=1)
    assert (colour_shift > 0.01).all(), colour_shift  # every image's mean colour moves
    for before, after in zip(_gray(batch), _gray(jittered)):
        assert torch.corrcoef(torch.stack([before, after]))[0, 1] > 0.9  # same tissue layout


def test_hed_jitter_draws_per_image(patches):
    torch.manual_seed(0)
    same = torch.stack([_as_float(patches[0])] * 2)
    out = HEDJitter(0.1)(same)
    assert not torch.allclose(out[0], out[1])


def test_hed_jitter_rejects_bad_input():
    with pytest.raises(ValueError, match="sigma"):
        HEDJitter(-0.1)
    with pytest.raises(ValueError, match="RGB"):
        HEDJitter(0.1)(torch.rand(1, 4, 8, 8))


@pytest.mark.parametrize("size", [(224, 224), (50, 70), (1, 1)])
def test_train_transform_output(patches, size):
    image = patches[1].resize(size)
    out = build_train_transform(96)(image)
    assert out.shape == (3, 96, 96) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_train_transform_options(patches):
    plain = build_train_transform(64, randaugment=None, stain_jitter=0.0, scale=(1.0, 1.0))
    assert not any(isinstance(t, HEDJitter) for t in plain.transforms)
    out = plain(patches[0])
    # Without RandAugment and stain jitter only geometry changes: the colour histogram is kept.
    ref = _as_float(patches[0].resize((64, 64), Image.BICUBIC))
    assert torch.allclose(out.mean(dim=(1, 2)), ref.mean(dim=(1, 2)), atol=0.02)


def test_eval_transform_is_deterministic_resize_and_centre_crop(patches):
    full = build_eval_transform(112)(patches[0])
    assert full.shape == (3, 112, 112)
    assert torch.equal(full, build_eval_transform(112)(patches[0]))
    expected = _as_float(patches[0].resize((112, 112), Image.BICUBIC))
    assert (full - expected).abs().mean() < 0.01
    cropped = build_eval_transform(112, crop_pct=0.5)(patches[0])  # resize to 224, keep the centre
    centre = _as_float(patches[0].crop((56, 56, 168, 168)))
    assert (cropped - centre).abs().mean() < 0.01
    with pytest.raises(ValueError, match="crop_pct"):
        build_eval_transform(112, crop_pct=1.5)


def test_normalization_from_processor_sources():
    import timm
    from transformers import TimmWrapperConfig, ViTImageProcessor

    hoptimus = ([0.707223, 0.578729, 0.703617], [0.211883, 0.230117, 0.177517])
    assert normalization_from_processor(ViTImageProcessor(image_mean=hoptimus[0], image_std=hoptimus[1])) == hoptimus
    assert normalization_from_processor({"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}) == ([0.5] * 3, [0.5] * 3)
    assert normalization_from_processor({"image_mean": [0.5], "image_std": [0.25]}) == ([0.5] * 3, [0.25] * 3)
    wrapper = TimmWrapperConfig(architecture="resnet18", pretrained_cfg={"mean": hoptimus[0], "std": hoptimus[1]})
    assert normalization_from_processor(wrapper) == hoptimus
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    imagenet = (list(IMAGENET_MEAN), list(IMAGENET_STD))
    for source in (model.pretrained_cfg, model):
        mean, std = normalization_from_processor(source)
        # pytest >= 9 refuses approx() of nested sequences: compare mean and std one list at a time.
        assert mean == pytest.approx(imagenet[0]) and std == pytest.approx(imagenet[1])
    assert normalization_from_processor(None) == imagenet
    assert normalization_from_processor({"crop_pct": 0.9}) == imagenet
    with pytest.raises(ValueError, match="3 mean"):
        normalization_from_processor({"mean": [0.1, 0.2], "std": [0.1, 0.2]})
