"""The loopback Hub against the real huggingface_hub / transformers clients (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers.utils.hub as transformers_hub
from huggingface_hub import HfApi, ModelCard, constants, hf_api, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
from transformers import (
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainingArguments,
)

try:
    from .hub_server import LoopbackHub, hub_env
except ImportError:  # tests/ is not a package; --import-mode=importlib does not put it on sys.path either
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hub_server import LoopbackHub, hub_env

TOKEN = "hf_loopbackSecret0123456789"


def tiny_resnet() -> ResNetForImageClassification:
    """A ~10k-parameter ResNet classifier; seeded so two calls give the same weights."""
    torch.manual_seed(0)
    config = ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8, num_labels=3)
    return ResNetForImageClassification(config).eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Assert both modules hold identical parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_upload_folder_then_from_pretrained(hub, tmp_path):
    model = tiny_resnet()
    model.save_pretrained(tmp_path / "local")
    api = HfApi()
    assert api.create_repo("user/tiny-resnet", exist_ok=True).repo_id == "user/tiny-resnet"
    assert api.create_repo("user/tiny-resnet", exist_ok=True).repo_id == "user/tiny-resnet"  # 409 path

    info = api.upload_folder(repo_id="user/tiny-resnet", folder_path=tmp_path / "local")

    assert info.oid == hub.head("user/tiny-resnet")
    for name in ("config.json", "model.safetensors"):
        assert hub.read("user/tiny-resnet", name) == (tmp_path / "local" / name).read_bytes()
    loaded = AutoModelForImageClassification.from_pretrained("user/tiny-resnet")
    assert type(loaded) is ResNetForImageClassification
    assert_same_weights(model, loaded)
    # Nothing escaped the tmp HF_HOME.
    cached = list((tmp_path / "hf_home" / "hub" / "models--user--tiny-resnet" / "snapshots").glob("*/config.json"))
    assert len(cached) == 1


def test_missing_file_and_missing_repo(hub):
    hub.create_repo("user/exists")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/exists", "nope.json")
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        hf_hub_download("user/does-not-exist", "config.json")
    assert not isinstance(anonymous.value, GatedRepoError)
    assert anonymous.value.response.status_code == 401  # the Hub hides repos from anonymous users
    with pytest.raises(RepositoryNotFoundError) as authenticated:
        HfApi().model_info("user/does-not-exist", token=TOKEN)
    assert authenticated.value.response.status_code == 404
    with pytest.raises(OSError, match="not a valid model identifier"):
        AutoModelForImageClassification.from_pretrained("user/does-not-exist")


def test_gated_repo_needs_the_token(hub, tmp_path):
    hub.gate("org/gated", token=TOKEN)
    hub.commit("org/gated", {"weights.txt": b"secret weights"})

    with pytest.raises(GatedRepoError) as anonymous:
        hf_hub_download("org/gated", "weights.txt")
    assert anonymous.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as wrong:
        hf_hub_download("org/gated", "weights.txt", token="hf_wrong")
    assert wrong.value.response.status_code == 403
    with pytest.raises(GatedRepoError):
        snapshot_download("org/gated")  # repo info and tree are public, the files are not

    path = hf_hub_download("org/gated", "weights.txt", token=TOKEN)
    assert Path(path).read_bytes() == b"secret weights"
    assert HfApi().model_info("org/gated").gated == "manual"
    # The token must not leak into anything written to disk, nor into the request log.
    for folder in (hub.root, tmp_path / "hf_home"):
        for file in folder.rglob("*"):
            if file.is_file():
                assert TOKEN.encode() not in file.read_bytes(), file
    assert TOKEN not in repr(hub.requests)


def test_push_to_hub_round_trip(hub):
    model = tiny_resnet()
    commit = model.push_to_hub("user/name2")

    assert commit.oid == hub.head("user/name2")
    assert {"config.json", "model.safetensors", "README.md"} <= set(HfApi().list_repo_files("user/name2"))
    assert_same_weights(model, AutoModelForImageClassification.from_pretrained("user/name2"))
    # Pushing identical files again is a no-op: the preupload `oid` lets the client skip them.
    assert model.push_to_hub("user/name2").oid == commit.oid


def test_trainer_push_to_hub(hub, tmp_path):
    images = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        push_to_hub=True,
        hub_model_id="trained",  # no namespace: the Hub puts it under the token's user
        hub_strategy="end",
        save_strategy="no",
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(model=tiny_resnet(), args=args, train_dataset=images)
    trainer.train()
    commit = trainer.push_to_hub()

    assert trainer.hub_model_id == "user/trained"
    assert commit.oid == hub.head("user/trained")
    assert {"README.md", "config.json", "model.safetensors"} <= set(HfApi().list_repo_files("user/trained"))
    assert_same_weights(trainer.model, AutoModelForImageClassification.from_pretrained("user/trained"))


def test_model_card_push_and_commit_history(hub):
    hub.create_repo("user/cards")
    first = hub.head("user/cards")
    ModelCard("---\nlicense: mit\n---\n# Tiny card\n").push_to_hub("user/cards")
    second = hub.head("user/cards")
    assert second != first
    assert ModelCard.load("user/cards").data.license == "mit"

    api = HfApi()
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="notes.txt", repo_id="user/cards")
    api.delete_file("README.md", repo_id="user/cards")
    latest = hub.head("user/cards")
    assert len({first, second, latest}) == 3
    assert set(api.list_repo_files("user/cards")) == {".gitattributes", "notes.txt"}
    # Older commits stay addressable by sha.
    old_readme = hf_hub_download("user/cards", "README.md", revision=second)
    assert "Tiny card" in Path(old_readme).read_text()
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/cards", "README.md")
    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="pr.txt", repo_id="user/cards", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and hub.head("user/cards") == latest
    assert hub.read("user/cards", "pr.txt", revision="refs/pr/1") == b"pr"


def test_hub_env_is_undone(tmp_path):
    before = (constants.ENDPOINT, constants.HF_HUB_CACHE, hf_api.api.endpoint, transformers_hub._hf_api)
    with LoopbackHub(tmp_path / "hub") as server, pytest.MonkeyPatch.context() as mp:
        home = hub_env(mp, server)
        assert constants.ENDPOINT == hf_api.api.endpoint == transformers_hub.hf_api().endpoint == server.url
        assert constants.HF_HUB_CACHE == str(home / "hub") and os.environ["HF_ENDPOINT"] == server.url
    assert (constants.ENDPOINT, constants.HF_HUB_CACHE, hf_api.api.endpoint, transformers_hub._hf_api) == before


def test_subprocess_recipe(hub, tmp_path):
    hub.create_repo("user/sub")
    hub.commit("user/sub", {"hello.txt": b"hi from the loopback hub"})
    script = textwrap.dedent(
        """
        import json, sys
        from huggingface_hub import constants, hf_hub_download
        path = hf_hub_download("user/sub", "hello.txt")
        print(json.dumps({"endpoint": constants.ENDPOINT, "path": path, "text": open(path).read()}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(hub.client_env(tmp_path / "child_home"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["endpoint"] == hub.url and result["text"] == "hi from the loopback hub"
    assert result["path"].startswith(str(tmp_path / "child_home"))
