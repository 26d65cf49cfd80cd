"""Issue 13, Security: the Hub token never lands in a run's files, flags that carry it warn, `--push_to_hub` fails
before training when it could not succeed, the upload-retry command uploads what the push uploads, and exported
configs carry no `auto_map`."""

import copy
import io
import json
import logging
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, id2label, tiny_vit
from hub_server import LoopbackHub

from moma_hf.commands.parsing import parse_args
from moma_hf.data.arguments import DataArguments
from moma_hf.hub import HubAccessError, check_push_access
from moma_hf.networks.students import build_student
from moma_hf.networks.teachers import load_teacher
from moma_hf.training import token_safety
from moma_hf.training_args import DistillationTrainingArguments

TOKEN = "hf_FAKEsecurityTOKEN0123456789abcdef"
DEMO = REPO / "examples"
# Short runs of the two scripts: two optimiser steps, a checkpoint after each, TensorBoard logs.
DISTILL = [DEMO / "distill.py", "--config", DEMO / "configs" / "demo.yaml", "--teacher_model_name_or_path",
           DEMO / "demo_teacher", "--train_dir", DEMO / "demo_data", "--validation_dir", DEMO / "demo_data",
           "--per_device_train_batch_size", "8", "--save_steps", "1", "--dataloader_num_workers", "0"]
TEACHER = [DEMO / "train_teacher.py", "--model_type", "vit", "--config_overrides",
           "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,patch_size=16",
           "--train_dir", DEMO / "demo_data", "--validation_dir", DEMO / "demo_data", "--image_size", "64",
           "--per_device_train_batch_size", "16", "--max_steps", "2", "--save_steps", "1", "--report_to",
           "tensorboard", "--use_cpu", "--seed", "0"]
FORBIDDEN_ON_HUB = ("checkpoint-", "_teacher-feature-cache", "training_args.bin")


def run_script(args, hub_env: dict, timeout=600):
    """Run a script as a user would, its token both in HF_TOKEN and as --hub_token unless `args` sets them."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update({"HF_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", **hub_env})
    return subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def files_holding(root: Path, secret: str) -> list[Path]:
    """Every file under `root` whose bytes contain `secret` (binary files included)."""
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def repo_files(hub: LoopbackHub, repo_id: str) -> set[str]:
    """Paths of the files on `main` of `repo_id`, minus the `.gitattributes` every new repo starts with."""
    info = json.loads(hub.handle("GET", f"/api/models/{repo_id}", b"", None)[2])
    return {s["rfilename"] for s in info["siblings"]} - {".gitattributes"}


# ---- 1. no artefact holds the token --------------------------------------------------------------------------

def test_args_pickles_hold_no_token_while_copies_in_memory_keep_it(tmp_path):
    args = DistillationTrainingArguments(output_dir=str(tmp_path), hub_token=TOKEN, report_to="none", use_cpu=True)
    buffer = io.BytesIO()
    torch.save(args, buffer)  # what the Trainer writes as checkpoint-*/training_args.bin
    assert TOKEN.encode() not in buffer.getvalue() and TOKEN.encode() not in pickle.dumps(args)
    restored = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert isinstance(restored, DistillationTrainingArguments) and restored.hub_token is None
    assert restored.queue_size == args.queue_size and restored.output_dir == args.output_dir
    assert copy.deepcopy(args).hub_token == TOKEN and copy.copy(args).hub_token == TOKEN
    assert TOKEN not in repr(args) and TOKEN not in str(args) and TOKEN not in args.to_json_string()


@pytest.mark.slow
def test_distill_run_resume_and_push_leave_the_token_nowhere_and_the_retry_uploads_what_the_push_does(tmp_path):
    with LoopbackHub(tmp_path / "hub") as hub:
        env = hub.client_env(tmp_path / "hf_home")
        out = tmp_path / "student"
        first = run_script([*DISTILL, "--output_dir", out, "--max_steps", "2", "--report_to", "tensorboard",
                            "--cache_teacher_features", "--cache_views", "1", "--hub_token", TOKEN,
                            "--push_to_hub", "--hub_model_id", "user/pushed"], env)
        assert first.returncode == 0, first.stderr[-4000:]
        pushed = repo_files(hub, "user/pushed")

        # A kill mid-checkpoint can leave an incomplete checkpoint; the resumed run must push none of it.
        cut_short = out / "checkpoint-99"
        cut_short.mkdir()
        (cut_short / "model.safetensors").write_bytes((out / "checkpoint-1" / "model.safetensors").read_bytes())
        hub.commit_error = (403, "Storage quota exceeded")
        resumed = run_script([*DISTILL, "--output_dir", out, "--max_steps", "3", "--report_to", "none",
                              "--cache_teacher_features", "--cache_views", "1", "--hub_token", TOKEN,
                              "--resume_from_checkpoint", out / "checkpoint-2", "--push_to_hub",
                              "--hub_model_id", "user/retried"], env)
        assert resumed.returncode != 0 and "HubPushError" in resumed.stderr, resumed.stderr[-4000:]
        assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
        assert not cut_short.exists()  # removed before training: it could never be resumed
        hub.commit_error = None
        command = next(line.strip() for line in resumed.stderr.splitlines() if line.strip().startswith("hf upload"))
        retry = subprocess.run(shlex.split(command), env={**os.environ, **env, "HF_TOKEN": TOKEN},
                               capture_output=True, text=True, timeout=300)
        assert retry.returncode == 0, retry.stderr[-3000:]
        retried = repo_files(hub, "user/retried")

        for run in (first, resumed, retry):
            assert TOKEN not in run.stdout + run.stderr
    assert retried == pushed
    assert {"model.safetensors", "config.json", "README.md", "training_args.json"} <= pushed
    assert any(name.startswith("runs/") for name in pushed)  # TensorBoard logs are part of a push
    assert not [name for name in pushed if name.startswith(FORBIDDEN_ON_HUB)]
    assert (out / "_teacher-feature-cache").is_dir() and (out / "checkpoint-3" / "training_args.bin").is_file()
    assert list(out.glob("runs/*/events.out.tfevents.*"))
    assert files_holding(tmp_path, TOKEN) == []  # outputs, checkpoints, logs, cards, the Hub's blobs, HF_HOME
    args = torch.load(out / "checkpoint-3" / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.max_steps == 3


@pytest.mark.slow
def test_train_teacher_output_and_push_hold_no_token(tmp_path):
    with LoopbackHub(tmp_path / "hub") as hub:
        out = tmp_path / "teacher"
        run = run_script([*TEACHER, "--output_dir", out, "--hub_token", TOKEN, "--push_to_hub",
                          "--hub_model_id", "user/teacher"], hub.client_env(tmp_path / "hf_home"))
        assert run.returncode == 0, run.stderr[-4000:]
        pushed = repo_files(hub, "user/teacher")
    assert TOKEN not in run.stdout + run.stderr
    assert (out / "training_args.bin").is_file() and (out / "checkpoint-2" / "training_args.bin").is_file()
    assert list(out.glob("runs/*/events.out.tfevents.*"))
    assert files_holding(tmp_path, TOKEN) == []
    assert {"model.safetensors", "config.json"} <= pushed
    assert not [name for name in pushed if name.startswith(FORBIDDEN_ON_HUB)]


# ---- 2. a token given as a flag warns -----------------------------------------------------------------------

@pytest.fixture
def fresh_warning(monkeypatch, caplog):
    monkeypatch.setattr(token_safety, "_warned", False)
    monkeypatch.delenv("RANK", raising=False)
    caplog.set_level(logging.WARNING, logger="moma_hf.training.token_safety")
    return caplog


def _token_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "--hub_token" in r.getMessage()]


def test_hub_token_flag_warns_once_and_never_prints_the_token(fresh_warning, tmp_path):
    flags = ["--train_dir", "examples/demo_data", "--output_dir", str(tmp_path), "--report_to", "none"]
    parse_args((DataArguments, DistillationTrainingArguments), flags)
    assert _token_warnings(fresh_warning) == []  # no flag, no warning (HF_TOKEN / hf auth login is the safe path)
    _, args = parse_args((DataArguments, DistillationTrainingArguments), [*flags, "--hub_token", TOKEN])
    parse_args((DataArguments, DistillationTrainingArguments), [*flags, f"--hub_token={TOKEN}"])
    assert args.hub_token == TOKEN  # the flag still works
    warnings = _token_warnings(fresh_warning)
    assert len(warnings) == 1 and "HF_TOKEN" in warnings[0] and "hf auth login" in warnings[0]
    assert TOKEN not in fresh_warning.text


def test_hub_token_in_yaml_warns_on_the_main_process_only(fresh_warning, tmp_path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text(f"train_dir: examples/demo_data\noutput_dir: {tmp_path}\nreport_to: none\nhub_token: {TOKEN}\n")
    monkeypatch.setenv("RANK", "1")
    parse_args((DataArguments, DistillationTrainingArguments), ["--config", str(config)])
    assert _token_warnings(fresh_warning) == []
    monkeypatch.setenv("RANK", "0")
    parse_args((DataArguments, DistillationTrainingArguments), ["--config", str(config)])
    assert len(_token_warnings(fresh_warning)) == 1 and TOKEN not in fresh_warning.text


# ---- 3. --push_to_hub preflight -----------------------------------------------------------------------------

def _push_args(tmp_path, token=None):
    return DistillationTrainingArguments(output_dir=str(tmp_path / "my-student"), push_to_hub=True, hub_token=token,
                                 report_to="none", use_cpu=True)


def test_preflight_creates_the_repo_with_a_write_token(hub, tmp_path):
    hub.add_token(TOKEN, "write")
    assert check_push_access(_push_args(tmp_path, TOKEN)) == "user/my-student"
    assert hub.head("user/my-student")  # created before any training


@pytest.mark.parametrize("case, expected", [
    ("bad token", r"rejected the token for the Hub repo 'my-student'.*401.*hf auth login"),
    ("read token", r"may not write to.*my-student.*403.*write access"),
    ("no token", r"none was found.*hf auth login.*HF_TOKEN"),
])
def test_preflight_names_the_repo_and_the_fix_never_the_token(hub, tmp_path, case, expected):
    hub.add_token(TOKEN, "write")
    hub.add_token("hf_readOnlyToken0123456789", "read")
    token = {"bad token": "hf_revokedToken0123456789", "read token": "hf_readOnlyToken0123456789"}.get(case)
    with pytest.raises(HubAccessError, match=expected) as error:
        check_push_access(_push_args(tmp_path, token))
    assert (token or TOKEN) not in str(error.value)
    assert not [r for r in hub.requests if "/commit/" in r[1]]


def test_preflight_fails_fast_when_the_hub_cannot_be_reached(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(HubAccessError, match=r"Cannot reach.*my-student.*HF_ENDPOINT.*--push_to_hub") as error:
        check_push_access(_push_args(tmp_path, TOKEN))
    assert TOKEN not in str(error.value)


@pytest.mark.slow
def test_scripts_with_push_to_hub_stop_before_training(tmp_path):
    with LoopbackHub(tmp_path / "hub") as hub:
        hub.add_token("hf_theOnlyValidToken0123456789", "write")
        out = tmp_path / "student"
        distill = run_script([*DISTILL, "--output_dir", out, "--max_steps", "2", "--push_to_hub",
                              "--hub_model_id", "user/student"], hub.client_env(tmp_path / "hf_home"))
    teacher = run_script([*TEACHER, "--output_dir", tmp_path / "teacher", "--push_to_hub"],
                         {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf_home")})
    for run, message in ((distill, "rejected the token for the Hub repo 'user/student'"),
                         (teacher, "Cannot reach the Hub repo 'teacher'")):
        assert run.returncode != 0
        last_line = run.stderr.strip().splitlines()[-1]
        assert last_line.startswith("moma_hf.hub.HubAccessError: ") and message in last_line, run.stderr[-3000:]
        assert TOKEN not in run.stdout + run.stderr
    assert not list(tmp_path.rglob("checkpoint-*")) and not list(tmp_path.rglob("model.safetensors"))


# ---- 5. exported configs carry no auto_map ------------------------------------------------------------------

def test_same_as_teacher_student_config_has_no_auto_map(tmp_path):
    teacher_model = tiny_vit()
    teacher_model.config.auto_map = {"AutoConfig": "configuration_custom.CustomConfig",
                                     "AutoModelForImageClassification": "modeling_custom.CustomViT"}
    teacher_model.save_pretrained(tmp_path / "teacher")
    assert "auto_map" in json.loads((tmp_path / "teacher" / "config.json").read_text())
    student, _ = build_student("same-as-teacher", id2label(["tumour", "normal"]),
                               teacher=load_teacher(str(tmp_path / "teacher")))
    student.save_pretrained(tmp_path / "student")
    assert "auto_map" not in json.loads((tmp_path / "student" / "config.json").read_text())
    assert student.config.id2label == {0: "tumour", 1: "normal"}
