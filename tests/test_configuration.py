"""Configs and model classes: AutoModel rebuilds the class of each method (old checkpoints included), a model
refuses another method's config, and each hyper-parameter rule answers the same wherever its value comes from."""

import json
import re

import pytest
import torch
from conftest import DEMO_DATA, NCT_CLASSES, timm_classifier, tiny_vit
from transformers import AutoConfig, AutoModel

from moma_hf import (
    BaselineDistillationConfig,
    BaselineForDistillation,
    DistillationConfig,
    DistillationSettings,
    DistillationTrainingArguments,
    Method,
    MoMAConfig,
    MoMAForDistillation,
    TeacherUpdate,
    distillation_model_class,
)
from moma_hf.commands.parsing import parse_args
from moma_hf.configuration_distillation import METHODS
from moma_hf.data.arguments import DataArguments

EXPECTED_CLASSES = {m: (MoMAForDistillation, MoMAConfig) if m.is_moma else (BaselineForDistillation,
                                                                              BaselineDistillationConfig)
                    for m in Method}


def _assert_same_weights(model, loaded):
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name


@pytest.mark.parametrize("method", METHODS)
def test_automodel_rebuilds_the_class_of_each_method_with_its_weights(method, small_moma, tmp_path):
    model = small_moma(method=method)
    model_class, config_class = EXPECTED_CLASSES[method]
    assert type(model) is model_class and type(model.config) is config_class
    assert distillation_model_class(method) is model_class
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == config_class.model_type and saved["method"] == method.value
    assert "use_attention" not in saved  # derived from the method, never stored
    assert type(AutoConfig.from_pretrained(tmp_path)) is config_class
    for loaded in (AutoModel.from_pretrained(tmp_path), model_class.from_pretrained(tmp_path)):
        assert type(loaded) is model_class and loaded.config.method is method
        _assert_same_weights(model, loaded)


def test_a_model_refuses_the_config_of_another_method_and_names_the_right_class(small_moma, tmp_path):
    kd = BaselineDistillationConfig(method="kd", student_config=timm_classifier().config,
                                    teacher_config=tiny_vit().config, teacher_id2label=dict(enumerate(NCT_CLASSES)))
    with pytest.raises(ValueError, match=r"MoMAForDistillation is for moma, moma-noattn, not method 'kd': use "
                                         r"BaselineForDistillation \(config BaselineDistillationConfig\)"):
        MoMAForDistillation(kd)
    with pytest.raises(ValueError, match=r"BaselineForDistillation is for ce, kd, dkd, fitnet, rkd, crd, not method "
                                         r"'moma': use MoMAForDistillation \(config MoMAConfig\)"):
        BaselineForDistillation.from_student_and_teacher(timm_classifier(), tiny_vit(), method="moma")
    with pytest.raises(ValueError, match=r"MoMAConfig is for moma, moma-noattn, not method 'crd': use "
                                         r"BaselineForDistillation"):
        MoMAConfig(method="crd")
    small_moma().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not method 'moma': use MoMAForDistillation"):
        BaselineForDistillation.from_pretrained(tmp_path)


def test_a_base_config_of_the_right_method_is_saved_under_the_models_own_type(tmp_path):
    config = DistillationConfig(method="ce", student_config=timm_classifier().config)
    model = BaselineForDistillation(config)
    assert type(model.config) is BaselineDistillationConfig and model.config.method is Method.CE
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "baseline-distillation"


@pytest.mark.parametrize("method", ["moma", "moma-noattn", "kd", "crd"])
def test_a_checkpoint_of_before_the_split_loads_as_its_methods_class(method, small_moma, tmp_path):
    # Before the redesign every method's config.json said model_type "moma", and it stored use_attention beside
    # the method: the ablation could read method "moma" with use_attention false.
    model = small_moma(method=method)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    old = json.loads(config_file.read_text())
    old.update(model_type="moma", use_attention=method != "moma-noattn")
    if method == "moma-noattn":
        old["method"] = "moma"
    config_file.write_text(json.dumps(old))
    model_class, config_class = EXPECTED_CLASSES[Method(method)]
    for loaded in (AutoModel.from_pretrained(tmp_path), model_class.from_pretrained(tmp_path),
                   DistillationConfig.from_pretrained(tmp_path)):
        config = loaded if isinstance(loaded, DistillationConfig) else loaded.config
        assert type(config) is config_class and config.method == method and config.model_type != "moma"
        assert config.use_attention == (method != "moma-noattn")
        if not isinstance(loaded, DistillationConfig):
            assert type(loaded) is model_class
            _assert_same_weights(model, loaded)
    resaved = tmp_path / "resaved"
    AutoModel.from_pretrained(tmp_path).save_pretrained(resaved)  # and saving converts it to the new format
    assert json.loads((resaved / "config.json").read_text())["model_type"] == config_class.model_type


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="multiple of"):
        DistillationConfig(projection_dim=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="momentum"):
        DistillationConfig(momentum=1.0)
    with pytest.raises(ValueError, match="global batch"):
        DistillationConfig(queue_size=32, global_batch_size=64)
    with pytest.raises(ValueError, match="w_kd"):
        DistillationConfig(student_config=timm_classifier().config, teacher_id2label={0: "tumour", 1: "normal"},
                           w_kd=1.0)
    same = DistillationConfig(student_config=timm_classifier().config, teacher_id2label=dict(enumerate(NCT_CLASSES)))
    assert same.w_kd == 1.0 and same.same_label_space


# ---- one-place validation ----------------------------------------------------------------------------
# (flags, the same values as config kwargs, the message): every rule that needs only the settings lives in
# DistillationSettings and answers alike through the CLI, a YAML file, config kwargs and a config.json.
RULES = [
    (["--method", "mkd"], {"method": "mkd"}, r"method='mkd' \(--method\) is not one of moma, moma-noattn, ce"),
    (["--teacher_update", "ema"], {"teacher_update": "ema"},
     r"teacher_update='ema' \(--teacher_update\) is not one of auto, momentum, frozen"),
    (["--attention_heads", "0"], {"num_attention_heads": 0},
     r"num_attention_heads=0 \(--attention_heads\) must be a positive integer"),
    (["--projection_dim", "30"], {"projection_dim": 30},
     r"projection_dim=30 must be a positive multiple of num_attention_heads=4"),
    (["--queue_size", "0"], {"queue_size": 0}, r"queue_size=0 must be positive"),
    (["--momentum", "1.0"], {"momentum": 1.0}, r"momentum=1.0 must lie in \[0, 1\)"),
    (["--kd_temperature", "0.0"], {"kd_temperature": 0.0}, r"kd_temperature=0.0 must be positive"),
    (["--w_moma", "-1.0"], {"w_moma": -1.0}, r"w_moma=-1.0 must be >= 0"),
]


def _parse(argv):
    return parse_args((DataArguments, DistillationTrainingArguments),
                      ["--train_dir", str(DEMO_DATA), "--output_dir", "out", "--report_to", "none", *argv])


def _message(build) -> str:
    with pytest.raises(ValueError) as error:
        build()
    return str(error.value)


@pytest.mark.parametrize("flags, values, message", RULES, ids=[rule[0][0] for rule in RULES])
def test_each_rule_answers_alike_from_flags_yaml_kwargs_and_config_json(flags, values, message, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"{flags[0][2:]}: {flags[1]}\n")
    config_dir = tmp_path / "checkpoint"
    MoMAConfig().save_pretrained(config_dir)
    config_json = json.loads((config_dir / "config.json").read_text())
    (config_dir / "config.json").write_text(json.dumps({**config_json, **values}))
    messages = {
        "flags": _message(lambda: _parse(flags)),
        "yaml": _message(lambda: _parse(["--config", str(yaml_file)])),
        "settings": _message(lambda: DistillationSettings(**values)),
        "config kwargs": _message(lambda: DistillationConfig(**values)),
        "config.json": _message(lambda: AutoConfig.from_pretrained(config_dir)),
    }
    assert len(set(messages.values())) == 1, messages
    assert re.search(message, messages["flags"])


def test_the_rules_that_need_context_answer_alike_from_arguments_and_config_json(tmp_path):
    args = DistillationTrainingArguments(output_dir=str(tmp_path), report_to="none", queue_size=32,
                                         per_device_train_batch_size=64, projection_dim=32)
    student = timm_classifier().config
    from_args = _message(lambda: MoMAConfig(student_config=student, **args.distillation_config_kwargs()))
    assert "queue_size=32 is smaller than the global batch (64" in from_args
    MoMAConfig(student_config=student, queue_size=32, projection_dim=32).save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config_json, "global_batch_size": 64}))
    assert _message(lambda: AutoConfig.from_pretrained(tmp_path)) == from_args


def test_attention_heads_is_an_alias_of_num_attention_heads_in_flags_and_yaml(tmp_path):
    for argv in (["--attention_heads", "2"], ["--num_attention_heads", "2"]):
        assert _parse(argv)[1].num_attention_heads == 2
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("attention_heads: 8\nprojection_dim: 64\n")
    args = _parse(["--config", str(yaml_file)])[1]
    assert args.num_attention_heads == 8 and args.distillation_config_kwargs()["num_attention_heads"] == 8
    yaml_file.write_text("attention_head: 8\n")
    with pytest.raises(ValueError, match=r"unknown keys: 'attention_head' \(did you mean 'attention_heads'\?\)"):
        _parse(["--config", str(yaml_file)])


def test_modes_are_enums_that_serialise_as_their_plain_strings(tmp_path):
    args = _parse(["--method", "kd", "--teacher_update", "frozen"])[1]
    assert args.method is Method.KD and args.teacher_update is TeacherUpdate.FROZEN and args.method == "kd"
    assert json.loads(args.to_json_string())["method"] == "kd"
    config = BaselineDistillationConfig(method="rkd")
    assert json.loads(config.to_json_string())["method"] == "rkd" and f"{config.method}" == "rkd"
    assert MoMAConfig(method="moma-noattn").use_attention is False and MoMAConfig().use_attention is True


@pytest.mark.parametrize("job", ["distill", "train_teacher"])
def test_streaming_without_max_steps_is_refused_by_every_job(job, tmp_path):
    from moma_hf.commands import distill, train_teacher

    main = {"distill": distill.main, "train_teacher": train_teacher.main}[job]
    with pytest.raises(ValueError, match=r"--streaming needs --max_steps: a stream has no length"):
        main(["--train_dir", str(DEMO_DATA), "--streaming", "--output_dir", str(tmp_path / "out"),
              "--report_to", "none"])
    assert not (tmp_path / "out").exists()  # refused before anything is loaded or written


def test_yaml_config_gives_defaults_and_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train_dir: examples/demo_data\nqueue_size: 128\nlearning_rate: 0.01\noutput_dir: out\n"
                      "report_to: none\nteacher_model_init_kwargs: {init_values: 0.00001}\n")
    data, args = parse_args((DataArguments, DistillationTrainingArguments),
                            ["--config", str(config), "--queue_size", "256"])
    assert data.train_dir == "examples/demo_data" and args.learning_rate == 0.01 and args.queue_size == 256
    assert args.teacher_model_init_kwargs == {"init_values": 1e-5}
    with pytest.raises(ValueError, match="--train_dir"):
        DataArguments()
