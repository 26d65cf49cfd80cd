"""Foundation-model teacher presets, offline: the published architectures on the meta device, each loader against a
scaled-down model in its library's Hub format on the loopback Hub, name resolution, gated repos, config round
trips, `--teacher_dtype` and the momentum teacher's feature width.

The expected facts below are written here from the models' cards, not read from `preset_registry.py`, so a wrong
registry entry fails.
"""

import copy
import dataclasses
import json
import re

import pytest
import safetensors.torch
import timm
import torch
from conftest import REPO, demo_patch_files, timm_classifier, tiny_vit
from huggingface_hub import create_repo, upload_folder
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    HfArgumentParser,
    TimmWrapperConfig,
    ViTImageProcessor,
)

from moma_hf import DistillationTrainingArguments, MoMAForDistillation, build_distillation_model
from moma_hf.configuration_distillation import parse_teacher_dtype
from moma_hf.data import build_eval_transform, load_rgb_image
from moma_hf.modules.heads import FixedProjection
from moma_hf.networks.backbones import pooled_features
from moma_hf.networks.preset_registry import PRESETS
from moma_hf.networks.teacher_presets import RECIPE_ATTRIBUTE, build_on_meta, find_preset, parameter_count
from moma_hf.networks.teachers import TeacherLoadError, load_teacher

TOKEN = "hf_preset_reader_token_42"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))  # H-optimus-0/1 and H0-mini cards
CLS, CLS_MEAN_PATCH = "cls", "cls+mean_patch"
# name: (normalization, embedding recipe, embedding dim), from each card's own loading and embedding code.
CARDS = {
    "phikon": (IMAGENET, CLS, 768), "phikon-v2": (IMAGENET, CLS, 1024), "uni": (IMAGENET, CLS, 1024),
    "uni2-h": (IMAGENET, CLS, 1536), "h-optimus-0": (HOPTIMUS, CLS, 1536), "h-optimus-1": (HOPTIMUS, CLS, 1536),
    "h0-mini": (HOPTIMUS, CLS_MEAN_PATCH, 1536), "virchow": (IMAGENET, CLS_MEAN_PATCH, 2560),
    "virchow2": (IMAGENET, CLS_MEAN_PATCH, 2560), "prov-gigapath": (IMAGENET, CLS, 1536),
}  # fmt: skip
# name: (token width, depth, patch size, prefix tokens = class token + registers = k, the first patch token).
ARCHITECTURES = {
    "phikon": (768, 12, 16, 1), "phikon-v2": (1024, 24, 16, 1), "uni": (1024, 24, 16, 1),
    "uni2-h": (1536, 24, 14, 9), "h-optimus-0": (1536, 40, 14, 5), "h-optimus-1": (1536, 40, 14, 5),
    "h0-mini": (768, 12, 14, 5), "virchow": (1280, 32, 14, 1), "virchow2": (1280, 32, 14, 5),
    "prov-gigapath": (1536, 40, 16, 1),
}  # fmt: skip
SWIGLU_PRESETS = {"uni2-h", "h-optimus-0", "h-optimus-1", "h0-mini", "virchow", "virchow2", "prov-gigapath"}
GATED = {"uni", "uni2-h", "h-optimus-1", "h0-mini", "virchow", "virchow2", "prov-gigapath"}
# Presets whose built count is not within the rounding of `parameters`, with the figure it is compared to (0.2%).
COUNT_EXCEPTIONS = {"virchow": 632e6, "virchow2": 632e6, "uni2-h": 681e6, "h0-mini": 85.7e6}
TIMM_SMALL = {"depth": 2, "embed_dim": 96, "num_heads": 2}  # 96, not 64: SwiGLU's packed hidden width must be even
TRANSFORMERS_SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


# ---- 1. the published architectures, on the meta device ---------------------------------------------------------
def test_the_registry_holds_the_ten_presets_with_the_cards_facts():
    assert set(PRESETS) == set(CARDS)
    assert {name for name, preset in PRESETS.items() if preset.gated} == GATED
    assert {name for name, preset in PRESETS.items() if preset.count_note} == set(COUNT_EXCEPTIONS)
    for name, ((mean, std), recipe, dim) in CARDS.items():
        preset = PRESETS[name]
        assert (preset.mean, preset.std, preset.embedding.value, preset.embedding_dim) == (mean, std, recipe, dim)
        assert (preset.input_size, preset.microns_per_pixel) == (224, 0.5), name
        plain = json.dumps(dataclasses.asdict(preset))  # names, never classes
        assert "<class" not in plain and json.loads(plain)["config"] == preset.config, name


@pytest.mark.parametrize("name", sorted(CARDS))
def test_the_published_architecture_builds_on_meta_with_its_count_width_and_tokens(name):
    preset = PRESETS[name]
    model = build_on_meta(preset)
    assert all(p.is_meta for p in model.parameters())
    count = parameter_count(model)
    if name in COUNT_EXCEPTIONS:
        assert abs(count - COUNT_EXCEPTIONS[name]) <= 0.002 * COUNT_EXCEPTIONS[name], count
    else:
        low, high = preset.parameter_range
        assert low <= count <= high, (count, preset.parameters)

    images = torch.empty(2, 3, 224, 224, device="meta")
    assert pooled_features(model, images)[0].shape == (2, CARDS[name][2])
    width, depth, patch, prefix = ARCHITECTURES[name]
    assert model(pixel_values=images).last_hidden_state.shape == (2, prefix + (224 // patch) ** 2, width)
    if preset.library == "timm":
        blocks = model.timm_model.blocks
        assert (len(blocks), model.timm_model.num_prefix_tokens) == (depth, prefix)
        mlp = blocks[0].mlp  # SwiGLUPacked is timm's GluMlp; its gate must be SiLU, as the cards build it
        swiglu = isinstance(mlp, timm.layers.GluMlp) and isinstance(mlp.act, torch.nn.SiLU)
        assert swiglu == (name in SWIGLU_PRESETS), (type(mlp), mlp.act)
    else:
        layers = [n for n, _ in model.named_modules() if re.fullmatch(r"(encoder\.layer|layers)\.\d+", n)]
        assert len(layers) == depth and getattr(model, "pooler", None) is None  # the card's CLS token, no pooler

    saved = json.loads(model.config.to_json_string())  # plain JSON, naming the preset and its recipe
    assert saved["teacher_preset"] == name and saved[RECIPE_ATTRIBUTE] == CARDS[name][1]


# ---- 2. each loader, on a scaled-down model in its library's Hub format ----------------------------------------------
def demo_patch(name: str) -> torch.Tensor:
    """`(1, 3, 224, 224)`: a real H&E tumour patch, normalized with the card's statistics for preset `name`."""
    path = next(f for f in demo_patch_files() if f.parent.name == "TUM")
    (mean, std), _, _ = CARDS[name]
    pixels = build_eval_transform(224)(load_rgb_image(str(path)))
    return ((pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).unsqueeze(0)


def scaled_model(name: str) -> torch.nn.Module:
    """The preset's class with its kwargs and recipe, only depth and width reduced (random weights, eval mode)."""
    preset = PRESETS[name]
    torch.manual_seed(0)
    if preset.library == "transformers":
        fields = {**preset.config, **TRANSFORMERS_SMALL}
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        return AutoModel.from_config(config, **preset.init_kwargs).eval()
    model = timm.create_model(preset.config["architecture"], pretrained=False, num_classes=0,
                              **{**preset.config["model_args"], **TIMM_SMALL}, **preset.constructor_kwargs())
    with torch.no_grad():  # trained LayerScales are far from 1e-5; at 1e-5 the blocks, and a wrong MLP, hide
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(".gamma"):
                parameter.uniform_(0.5, 1.0)
    return model.eval()


def push_scaled(hub, name: str) -> torch.nn.Module:
    """Save `scaled_model(name)` as its library saves for the Hub, push it under the preset's Hub id (gated with
    TOKEN when the real repo is) and return it."""
    preset, model = PRESETS[name], scaled_model(name)
    folder = hub.root.parent / "export" / name
    if preset.library == "transformers":
        model.save_pretrained(folder)
        ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=list(preset.mean),
                          image_std=list(preset.std)).save_pretrained(folder)
    else:  # timm's Hub layout; model_args deliberately only depth/width: the preset must fill in the rest
        folder.mkdir(parents=True)
        safetensors.torch.save_file(model.state_dict(), folder / "model.safetensors")
        pretrained_cfg = {"input_size": [3, 224, 224], "fixed_input_size": False, "interpolation": "bicubic",
                          "crop_pct": 1.0, "mean": list(preset.mean), "std": list(preset.std), "num_classes": 0}
        (folder / "config.json").write_text(json.dumps({
            "architecture": preset.config["architecture"], "num_classes": 0, "num_features": TIMM_SMALL["embed_dim"],
            "model_args": TIMM_SMALL, "pretrained_cfg": pretrained_cfg}))  # fmt: skip
    create_repo(preset.hub_id)
    upload_folder(repo_id=preset.hub_id, folder_path=folder)
    if preset.gated:
        hub.gate(preset.hub_id, TOKEN)
    return model


@torch.no_grad()
def card_embedding(name: str, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The embedding as the card computes it, by hand from the model's own token outputs."""
    if PRESETS[name].library == "timm":
        tokens = model.forward_features(images)
    else:
        tokens = model(pixel_values=images).last_hidden_state
    if CARDS[name][1] == CLS:
        return tokens[:, 0]
    k = ARCHITECTURES[name][3]  # virchow 1, virchow2 5, h0-mini 5
    return torch.cat([tokens[:, 0], tokens[:, k:].mean(dim=1)], dim=-1)


def assert_loaded_as_saved(name: str, teacher, scaled: torch.nn.Module) -> None:
    """Same weights, and the preset's embedding equals the card's, on a real patch."""
    loaded = teacher.model.timm_model if PRESETS[name].library == "timm" else teacher.model
    saved, restored = scaled.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[key], restored[key]) for key in saved)
    images = demo_patch(name)
    with torch.no_grad():
        embedding = pooled_features(teacher.model, images)[0]
    expected = card_embedding(name, scaled, images)
    assert embedding.shape == expected.shape
    torch.testing.assert_close(embedding, expected)


@pytest.mark.parametrize("name", sorted(CARDS))
def test_each_preset_loads_its_scaled_model_from_the_hub_with_the_cards_embedding(hub, name):
    scaled = push_scaled(hub, name)
    preset = PRESETS[name]
    teacher = load_teacher(name, token=TOKEN)
    assert teacher.preset is preset and teacher.model.config.teacher_preset == name
    width = TIMM_SMALL["embed_dim"] if preset.library == "timm" else TRANSFORMERS_SMALL["hidden_size"]
    scaled_dim = width * (2 if CARDS[name][1] != CLS else 1)  # the full-size model's is CARDS[name][2]
    assert (teacher.feature_dim, tuple(teacher.mean), tuple(teacher.std)) == (scaled_dim, *CARDS[name][0])
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert_loaded_as_saved(name, teacher, scaled)
    assert card_embedding(name, scaled, demo_patch(name)).shape[-1] == scaled_dim
    if preset.library == "timm" and CARDS[name][1] == CLS:  # these cards call model(image) for the embedding
        with torch.no_grad():
            torch.testing.assert_close(pooled_features(teacher.model, demo_patch(name))[0], scaled(demo_patch(name)))


@pytest.mark.parametrize(("classes", "failure", "message"), [
    ({}, RuntimeError, "ignore_mismatched_sizes"),  # a plain MLP: its fc2 is twice as wide, the weights do not load
    ({"act_layer": "SiLU"}, RuntimeError, "ignore_mismatched_sizes"),
    ({"mlp_layer": "SwiGLUPacked"}, AssertionError, "not close"),  # the same weights gated by GELU: other features
])
def test_a_loader_without_the_cards_swiglu_classes_is_caught(hub, monkeypatch, classes, failure, message):
    scaled = push_scaled(hub, "virchow2")
    monkeypatch.setitem(PRESETS, "virchow2", dataclasses.replace(PRESETS["virchow2"], constructor_classes=classes))
    with pytest.raises(failure, match=message):
        assert_loaded_as_saved("virchow2", load_teacher("virchow2", token=TOKEN), scaled)


# ---- 3. resolution -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["uni2-h", "UNI2-H", "MahmoodLab/UNI2-h", "mahmoodlab/uni2-h",
                                      "hf-hub:MahmoodLab/UNI2-h", "hf-hub:MAHMOODLAB/uni2-H",
                                      "hf_hub:MahmoodLab/UNI2-h"])  # timm also takes the underscore
def test_a_preset_is_found_by_short_name_or_hub_id_in_any_case(spelling):
    assert find_preset(spelling) is PRESETS["uni2-h"]


def test_unknown_names_are_no_preset_and_every_preset_finds_itself():
    for name in ("owkin/phikon-v3", "uni3", "timm/vit_base_patch16_224", "", None):
        assert find_preset(name) is None
    for preset in PRESETS.values():
        assert find_preset(preset.name) is find_preset(preset.hub_id) is find_preset(f"hf-hub:{preset.hub_id}")


def test_a_local_folder_named_like_a_preset_wins(hub, tmp_path, monkeypatch):
    tiny_vit(classifier=False).save_pretrained(tmp_path / "virchow2")
    monkeypatch.chdir(tmp_path)
    teacher = load_teacher("virchow2")
    assert teacher.preset is None and teacher.feature_dim == 48 and type(teacher.model).__name__ == "ViTModel"
    assert not hasattr(teacher.model.config, "teacher_preset")
    assert not hub.requests  # nothing was asked of the Hub


# ---- 4. gated presets ------------------------------------------------------------------------------------------------
def test_a_gated_preset_without_any_token_fails_before_any_request(hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # hub_env also set HF_HOME to tmp: no stored token either
    for token in (None, False):
        with pytest.raises(TeacherLoadError) as error:
            load_teacher("uni2-h", token=token)
        message = str(error.value)
        assert f"{hub.url}/MahmoodLab/UNI2-h" in message and "HF_TOKEN" in message
    assert not [request for request in hub.requests if "UNI2-h" in request[1]]


def test_a_gated_preset_with_a_wrong_token_names_the_model_page(hub):
    hub.gate("MahmoodLab/UNI2-h", TOKEN)
    with pytest.raises(TeacherLoadError, match="is gated") as error:
        load_teacher("uni2-h", token="hf_not_the_granted_token")
    assert f"{hub.url}/MahmoodLab/UNI2-h" in str(error.value)


# ---- 5. a distillation model's config round trip -----------------------------------------------------------------
def moma_with(teacher_model, **settings):
    """MoMA around a tiny timm student and `teacher_model`, with small heads and queue."""
    return build_distillation_model(timm_classifier(), teacher_model, None, projection_dim=32,
                                    num_attention_heads=4, queue_size=64, **settings)


def assert_same_teacher(model, loaded, images):
    """Same teacher weights, and the same `(B, d_t)` teacher features on `images`."""
    original, restored = model.teacher.state_dict(), loaded.teacher.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[key], restored[key]) for key in original)
    torch.testing.assert_close(loaded.teacher_outputs(images)[0], model.teacher_outputs(images)[0])


def test_a_preset_teacher_round_trips_through_the_config_as_names(hub, tmp_path):
    push_scaled(hub, "virchow2")
    model = moma_with(load_teacher("virchow2", token=TOKEN).model)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "<class" not in text and "timm.layers" not in text  # the classes come back from the preset's name
    saved = json.loads(text)["teacher_config"]
    assert "SwiGLUPacked" not in json.dumps(saved["model_args"])
    assert saved["teacher_preset"] == "virchow2" and saved[RECIPE_ATTRIBUTE] == CLS_MEAN_PATCH
    assert saved["model_args"] == {**PRESETS["virchow2"].config["model_args"], **TIMM_SMALL}

    loaded = MoMAForDistillation.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.teacher.timm_model.blocks[0].mlp, timm.layers.GluMlp)
    images = demo_patch("virchow2")
    assert_same_teacher(model.eval(), loaded, images)
    features, logits = loaded.teacher_outputs(images)
    assert features.shape == (1, 2 * TIMM_SMALL["embed_dim"]) and logits is None


# ---- 6. teacher precision -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("flag", "name"), [("bf16", "bfloat16"), ("BF16", "bfloat16"), ("bfloat16", "bfloat16"),
                                            ("fp16", "float16"), ("fp32", "float32"), ("float32", "float32")])
def test_teacher_dtype_aliases(flag, name, tmp_path):
    assert parse_teacher_dtype(flag) == name
    args, = HfArgumentParser(DistillationTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--teacher_dtype", flag, "--report_to", "none"])
    assert args.teacher_dtype == name


def test_an_invalid_teacher_dtype_names_the_flag_and_the_choices():
    with pytest.raises(ValueError, match=r"teacher_dtype='int8' \(--teacher_dtype\) is not one of float32, bfloat16"):
        parse_teacher_dtype("int8")


def test_a_bf16_frozen_teacher_hands_on_float32_features_close_to_fp32(hub, tmp_path):
    push_scaled(hub, "virchow2")
    teacher = load_teacher("virchow2", token=TOKEN).model
    reference = moma_with(copy.deepcopy(teacher)).eval()
    model = moma_with(teacher, teacher_dtype="bf16").eval()
    assert model.teacher_update == "frozen" and model.config.teacher_dtype == "bfloat16"
    assert {p.dtype for p in model.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.student.parameters()} == {torch.float32}
    assert model.key_queue.queue.dtype == torch.float32 and isinstance(model.key_head, FixedProjection)
    images = demo_patch("virchow2")
    features, expected = model.teacher_outputs(images)[0], reference.teacher_outputs(images)[0]
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())

    model.save_pretrained(tmp_path)
    loaded = MoMAForDistillation.from_pretrained(tmp_path).eval()
    assert {p.dtype for p in loaded.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.student.parameters()} == {torch.float32}
    assert_same_teacher(model, loaded, images)


def test_a_momentum_teacher_refuses_a_low_precision_dtype():
    student = timm_classifier()
    with pytest.raises(ValueError, match="--teacher_update frozen"):
        moma_with(copy.deepcopy(student), teacher_update="momentum", teacher_dtype="bf16")


# ---- 7. a momentum teacher reads its feature as the student does -------------------------------------------------
def test_a_same_architecture_teacher_whose_recipe_widens_the_feature_cannot_be_momentum():
    """Twins but for the teacher's recipe (cls+mean_patch, as Virchow's): the key pathway could not be an EMA."""
    architecture, model_args = "vit_small_patch16_224", {"depth": 2, "embed_dim": 96, "num_heads": 2, "img_size": 224}
    student = AutoModelForImageClassification.from_config(
        TimmWrapperConfig(architecture=architecture, model_args=model_args, num_labels=9))
    teacher_config = TimmWrapperConfig(architecture=architecture, model_args=model_args)
    setattr(teacher_config, RECIPE_ATTRIBUTE, CLS_MEAN_PATCH)
    teacher = AutoModel.from_config(teacher_config)
    settings = dict(projection_dim=32, num_attention_heads=4, queue_size=64)
    with pytest.raises(ValueError, match=r"embedding has 192 dims and the student.s 96 .*Use --teacher_update frozen"):
        build_distillation_model(student, teacher, None, teacher_update="momentum", **settings)
    auto = build_distillation_model(student, teacher, None, **settings)  # "auto" falls back to a frozen teacher
    assert auto.teacher_update == "frozen" and auto.key_head.weight.shape == (32, 2 * 96)


# ---- 8. the job: `--teacher_model_name_or_path <preset>` -------------------------------------------------------------
@pytest.mark.slow
def test_distill_resolves_a_preset_by_name_and_its_card_names_the_preset_and_recipe(hub, tmp_path, monkeypatch):
    """moma-distill with `virchow2` (a scaled model of its class on the loopback Hub), its recipe, in bf16, with
    the teacher-feature cache: the preset is resolved, the card and configs name it, nothing holds a class."""
    from huggingface_hub import ModelCard

    from moma_hf.commands import distill

    push_scaled(hub, "virchow2")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    flags = ["--teacher_model_name_or_path", "virchow2", "--teacher_dtype", "bf16", "--cache_teacher_features",
             "--train_dir", "examples/demo_data", "--validation_dir", "examples/demo_data", "--image_size", "112",
             "--max_steps", "2", "--per_device_train_batch_size", "8", "--queue_size", "64", "--projection_dim", "32",
             "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(out)]
    assert distill.main(flags) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "paige-ai/Virchow2"  # the preset's Hub id, not the short name
    assert "- **Teacher preset:** `virchow2` (embedding cls+mean_patch, 2560-d, bfloat16)" in card.text
    exported = json.loads((out / "config.json").read_text())
    assert exported["distilled_from"] == {"teacher": "virchow2", "revision": "main", "preset": "virchow2"}
    configs = "".join(p.read_text() for p in out.rglob("*.json"))
    assert "<class" not in configs
    # Every file the run wrote, binaries (safetensors, training_args.bin, cache shards) included: no token.
    assert (out / "checkpoint-2" / "training_args.bin").is_file()  # a pickle, the likeliest place for a token
    leaked = [p for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_a_same_as_teacher_student_of_a_swiglu_preset_is_built_with_the_presets_classes(hub):
    """The paper's setting with a foundation model: the student copies the teacher's SwiGLU backbone."""
    from moma_hf.networks.students import build_student

    push_scaled(hub, "uni2-h")
    teacher = load_teacher("uni2-h", token=TOKEN)
    student, _ = build_student("same-as-teacher", {0: "benign", 1: "tumour"}, teacher=teacher)
    assert isinstance(student.timm_model.blocks[0].mlp, timm.layers.GluMlp)
    assert "<class" not in student.config.to_json_string() and student.config.teacher_preset == "uni2-h"
    images = demo_patch("uni2-h")
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(student, images)[0], pooled_features(teacher.model, images)[0])
