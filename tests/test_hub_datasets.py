"""`distill.py --dataset_name org/ds --streaming` streams a Hub dataset by repo id from the loopback Hub, in 1 and
in 2 processes, with an unlabeled Hub pool (`--unlabeled_dataset_name`), and honours revision pins of both.

Each dataset repo has two revisions. The labeled one: a 9-class commit, then a 3-class commit on `main`, so the
exported student's labels show which revision trained it. The unlabeled pool: shards under `v1/`, then a commit
that moves them to `v2/`, so the server's request log shows which revision was streamed.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import REPO, launch_command, launch_env
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

DEMO = REPO / "examples" / "demo_data"
CLASSES = sorted(p.name for p in (DEMO / "train").iterdir() if p.is_dir())
FEW = CLASSES[:3]


def _parquet_shards(split: str, classes: list[str] | None, n_shards: int) -> list[bytes]:
    """Real demo patches of `split` as parquet shards: image bytes, and a ClassLabel of `classes` (None: no label)."""
    files = sorted(f for f in (DEMO / split).glob("*/*") if classes is None or f.parent.name in classes)
    columns = {"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files]}
    features = {"image": datasets.Image()}
    if classes is not None:
        columns["label"] = [classes.index(f.parent.name) for f in files]
        features["label"] = datasets.ClassLabel(names=classes)
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    shards = []
    for index in range(n_shards):
        buffer = io.BytesIO()
        dataset.shard(n_shards, index, contiguous=True).to_parquet(buffer)
        shards.append(buffer.getvalue())
    return shards


def _commit(api: HfApi, repo_id: str, files: dict[str, bytes], delete: tuple[str, ...] = ()) -> str:
    operations = [CommitOperationAdd(path, data) for path, data in files.items()]
    operations += [CommitOperationDelete(path, is_folder=True) for path in delete]
    return api.create_commit(repo_id, operations, commit_message="data", repo_type="dataset").oid


def _split_files(folder: str, split: str, shards: list[bytes]) -> dict[str, bytes]:
    return {f"{folder}/{split}-{i:05d}-of-{len(shards):05d}.parquet": s for i, s in enumerate(shards)}


@pytest.fixture
def hub_datasets(hub):
    """Push `org/nct-patches` and `org/nct-pool` (two revisions each); returns the first revisions' shas."""
    api = HfApi()
    api.create_repo("org/nct-patches", repo_type="dataset")
    labeled_v1 = _commit(api, "org/nct-patches", {
        **_split_files("data", "train", _parquet_shards("train", CLASSES, 2)),
        **_split_files("data", "validation", _parquet_shards("validation", CLASSES, 1)),
    })
    _commit(api, "org/nct-patches", {
        **_split_files("data", "train", _parquet_shards("train", FEW, 2)),
        **_split_files("data", "validation", _parquet_shards("validation", FEW, 1)),
    })
    api.create_repo("org/nct-pool", repo_type="dataset")
    pool = _split_files("v1", "train", _parquet_shards("validation", None, 2))
    pool_v1 = _commit(api, "org/nct-pool", pool)
    _commit(api, "org/nct-pool", {path.replace("v1/", "v2/"): data for path, data in pool.items()}, delete=("v1",))
    return labeled_v1, pool_v1


def _distill_args(output_dir: Path, *extra) -> list[str]:
    return [
        "--dataset_name", "org/nct-patches", "--streaming", "--max_steps", "2",
        "--unlabeled_dataset_name", "org/nct-pool", "--labeled_fraction", "0.5",
        "--teacher_model_name_or_path", str(REPO / "examples" / "demo_teacher"),
        "--student_model_name_or_path", "resnet18", "--image_size", "112", "--per_device_train_batch_size", "4",
        "--queue_size", "32", "--save_steps", "100", "--report_to", "none", "--dataloader_num_workers", "0",
        "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def _trained_labels(output_dir: Path) -> list[str]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    config = json.loads((output_dir / "config.json").read_text())
    return config["label_names"]


def _pool_folders_read(hub) -> set[str]:
    """Folders of `org/nct-pool` whose parquet shards the clients downloaded."""
    paths = [path for method, path, status in hub.requests
             if method == "GET" and status in (200, 206) and "/datasets/org/nct-pool/resolve/" in path]
    return {path.split("/resolve/", 1)[1].split("/")[1] for path in paths if path.endswith(".parquet")}


@pytest.mark.slow
def test_streams_hub_datasets_by_id_in_one_process(hub, hub_datasets, tmp_path):
    _, pool_v1 = hub_datasets
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "examples" / "distill.py"), "--use_cpu",
               *_distill_args(out, "--unlabeled_dataset_revision", pool_v1)]
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _trained_labels(out) == FEW, "the labeled dataset's default revision is main (the 3-class commit)"
    assert _pool_folders_read(hub) == {"v1"}, "--unlabeled_dataset_revision pins the pool to its first commit"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_streams_hub_datasets_by_id_in_two_processes(hub, hub_datasets, tmp_path):
    labeled_v1, _ = hub_datasets
    out = tmp_path / "out"
    command = launch_command(REPO / "examples" / "distill.py", *_distill_args(out, "--dataset_revision", labeled_v1))
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _trained_labels(out) == CLASSES, "--dataset_revision pins the labeled dataset to its 9-class commit"
    assert _pool_folders_read(hub) == {"v2"}, "the pool's default revision is main"
