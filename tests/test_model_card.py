"""Cards state only what happened, `--method ce` needs and loads no teacher, and every loss term that is off is
logged with its reason (issue 13: "A `ce` run's card says distillation", "`--method ce` still needs and loads a
teacher", "KD switches off silently")."""

import importlib.util
import logging
import re
import sys
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import NCT_CLASSES, REPO, id2label, timm_classifier
from huggingface_hub import ModelCard

from moma_hf.configuration_distillation import DistillationConfig

RUN_FLAGS = ["--max_steps", "2", "--save_strategy", "no", "--report_to", "none", "--per_device_train_batch_size", "8",
             "--disable_tqdm", "true", "--logging_steps", "1"]


def _distill():
    """examples/distill.py, which runs `moma_hf.commands.distill` with the demo config as its defaults."""
    spec = importlib.util.spec_from_file_location("distill", REPO / "examples" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["distill"] = module
    spec.loader.exec_module(module)
    return module


def _hyperparameters(card_text: str) -> dict[str, str]:
    """The card's hyper-parameter table, `{name: value}` (bold marks stripped)."""
    rows = re.findall(r"^\| (\w+) \| (.+?) \|$", card_text.split("## Training", 1)[1], flags=re.M)
    return {name: value.strip("*") for name, value in rows if name != "parameter"}


@pytest.mark.timeout(600)
def test_ce_with_the_demo_config_loads_no_teacher_and_its_card_names_none(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    distill = _distill()

    def no_teacher(*args, **kwargs):
        raise AssertionError("a ce run loaded a teacher")

    monkeypatch.setattr("moma_hf.commands.distill.load_teacher", no_teacher)
    out = tmp_path / "ce"
    assert distill.main(RUN_FLAGS + ["--method", "ce", "--output_dir", str(out)]) == 0  # the demo config names one
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and card.data.get("base_model_relation") is None
    assert "knowledge-distillation" not in card.data.tags and "moma" not in card.data.tags
    assert "Teacher:" not in card.text and "distilled" not in card.text and "demo_teacher" not in card.content
    table = _hyperparameters(card.text)
    assert "None" not in table.values() and not {"w_kd", "w_moma", "queue_size", "teacher_update"} & set(table)
    assert table["method"] == "ce" and '"teacher_model_name_or_path": null' in (out / "training_args.json").read_text()
    scores = {m["type"] for m in card.data.to_dict()["model-index"][0]["results"][0]["metrics"]}
    assert {"accuracy", "macro_f1"} <= scores and not {"samples", "unreadable_images"} & scores  # counts, not scores


@pytest.mark.timeout(600)
def test_ce_needs_no_teacher_flag_and_takes_the_students_image_size(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "ce"
    flags = RUN_FLAGS + ["--method", "ce", "--train_dir", "examples/demo_data", "--validation_split", "",
                         "--student_model_name_or_path", "test_resnet", "--output_dir", str(out)]
    assert _distill().main(flags) == 0
    assert "input 160 px" in (out / "README.md").read_text()  # timm's test_resnet default; no teacher to ask


@pytest.fixture
def integer_labeled_parquet(tmp_path):
    """The demo training patches as parquet whose label column holds plain integers 0..8 (no class names)."""
    files = sorted((REPO / "examples" / "demo_data" / "train").glob("*/*.jpg"))
    table = pa.table({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files],
                      "label": [NCT_CLASSES.index(f.parent.name) for f in files]})
    pq.write_table(table, tmp_path / "train.parquet")
    return tmp_path / "train.parquet"


@pytest.mark.timeout(600)
def test_kd_switched_off_by_integer_labels_is_logged_and_the_card_says_so(integer_labeled_parquet, tmp_path,
                                                                         monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    out = tmp_path / "moma"
    flags = RUN_FLAGS + ["--train_dir", str(integer_labeled_parquet), "--validation_split", "", "--image_size", "112",
                         "--teacher_model_name_or_path", "examples/demo_teacher", "--queue_size", "64",
                         "--output_dir", str(out)]
    with caplog.at_level(logging.WARNING):
        assert _distill().main(flags) == 0
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "is off for this run" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("loss_kd is off") and "'ADI'" in warnings[0] and "['0', '1'" in warnings[0]

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None  # a local folder is no Hub base model
    assert "other label space (logit KD off, w_kd 0)" in card.text
    table = _hyperparameters(card.text)
    assert table["w_kd"] == "0.0" and "kd_temperature" not in table and "None" not in table.values()


def test_every_switched_off_term_has_a_reason():
    student = timm_classifier().config
    same = dict(student_config=student, teacher_id2label=id2label(), projection_dim=32, queue_size=64)
    assert DistillationConfig(**same).switched_off_terms() == {}
    assert DistillationConfig(**same, w_kd=0, w_moma=0, w_ce=0).switched_off_terms() == {
        "loss_ce": "w_ce=0", "loss_kd": "w_kd=0", "loss_moma": "w_moma=0"}
    headless = DistillationConfig(**{**same, "teacher_id2label": None}, teacher_name_or_path="owkin/phikon")
    assert headless.switched_off_terms() == {
        "loss_kd": "the teacher owkin/phikon has no classifier head, so it gives no logits"}
    fitnet = DistillationConfig(**same, method="fitnet", w_feature=0)
    assert fitnet.switched_off_terms() == {"loss_fitnet": "w_feature=0"}
    assert DistillationConfig(**same, method="ce").switched_off_terms() == {}


def _card_text(model, tmp_path, log_history, **args):
    """The card `write_model_card` renders for `model` after a run that logged `log_history` (no training)."""
    from transformers import TrainerState

    from moma_hf import DistillationTrainingArguments
    from moma_hf.evaluation.model_card import DistillationModelCardData, write_model_card

    state = TrainerState(global_step=3, log_history=log_history)
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", **args)
    run = SimpleNamespace(distillation_model=model, state=state, model_card_data=None, args=args)
    return write_model_card(run, tmp_path / "run", DistillationModelCardData(image_size=64)).read_text()


def test_the_card_takes_its_facts_from_the_models_config_and_the_logged_history(small_moma, tmp_path):
    model = small_moma(method="fitnet", w_feature=50.0)  # as the run's arguments below set it
    history = [{"step": s, "loss": 1.0 / s, "loss_ce": 0.5 / s, "loss_fitnet": 0.2 / s, "labeled_fraction": 0.25}
               for s in (1, 2, 3)]
    text = _card_text(model, tmp_path, history, method="fitnet", w_feature=50.0, learning_rate=0.01)
    assert f"({model.student_summary['num_parameters'] / 1e6:.1f}M parameters)" in text
    assert "`test_resnet`" in text and "`fitnet` baseline" in text and "3 optimiser steps" in text
    assert "25.0% of the training examples were labeled" in text
    table = _hyperparameters(text)
    assert table["method"] == "fitnet" and table["w_feature"] == "50.0" and table["learning_rate"] == "0.01"
    assert "| w_feature | **50.0** |" in text and "| seed | 42 |" in text  # bold: set by the user
    assert not {"w_kd", "queue_size", "kd_temperature"} & set(table)  # terms fitnet never used
    assert (tmp_path / "run" / "training_curves.png").exists()


def test_the_card_reads_the_labeled_share_under_its_old_key_and_omits_it_when_every_example_was_labeled(
        small_moma, tmp_path):
    from moma_hf.evaluation.model_card import labeled_percent

    assert labeled_percent([{"step": 1, "labelled_fraction": 0.5}, {"step": 2, "labeled_fraction": 0.7}]) == 60.0
    assert labeled_percent([{"step": 1, "labeled_fraction": 1.0}]) is None and labeled_percent([]) is None
    text = _card_text(small_moma(), tmp_path, [{"step": 1, "loss": 1.0, "labeled_fraction": 1.0}])
    assert "were labeled" not in text and "with\n[MoMA]" in text
    assert _hyperparameters(text)["teacher_update"] == "frozen"  # resolved by the model from "auto"
