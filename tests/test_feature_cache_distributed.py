"""The caching pass in several processes and across interruptions: 2 gloo processes under `accelerate launch` build
the cache of 1 process bit for bit, and a pass stopped by SIGTERM continues from its finished shards to the same
cache (tests/_cache_build_worker.py builds; the cache's files are compared as raw Arrow data)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import REPO, launch_command, launch_env, launch_two_processes, make_trainer

from moma_hf.commands.teacher_cache import cache_teacher_outputs
from moma_hf.data.feature_cache import META_FILE, read_shard

WORKER = REPO / "tests" / "_cache_build_worker.py"
PREEMPTED = 143


def _worker_args(data, cache, out, *extra):
    return [str(WORKER), "--data", str(data), "--cache", str(cache), "--out", str(out), *map(str, extra)]


def _build_alone(data, cache, out, *extra):
    """The worker as one plain process with one thread (no launcher, no process group)."""
    result = subprocess.run([sys.executable, *_worker_args(data, cache, out, *extra)], env=launch_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def _forwards(out: Path) -> dict[int, int]:
    """Images each rank's teacher saw (all views)."""
    return {int(f.stem.split("-")[1]): json.loads(f.read_text()) for f in out.glob("forwards-*.json")}


def _assert_same_cache(built: Path, reference: Path):
    """Same shard files holding the same raw bytes of keys and outputs (and schema facts), same cache facts."""
    shards = sorted(p.name for p in reference.glob("shard-*.arrow"))
    assert shards and sorted(p.name for p in built.glob("shard-*.arrow")) == shards
    for name in shards:
        mine, theirs = read_shard(built / name), read_shard(reference / name)
        assert mine.equals(theirs, check_metadata=True), name
        for column in ("features", "logits"):  # the raw float32 bit patterns, not values within a tolerance
            bits = [t.column(column).combine_chunks().flatten().flatten().to_numpy().view(np.uint32)
                    for t in (mine, theirs)]
            assert np.array_equal(*bits), (name, column)
    record = {k: v for k, v in json.loads((built / META_FILE).read_text()).items() if not k.startswith("build_")}
    expected = {k: v for k, v in json.loads((reference / META_FILE).read_text()).items() if not k.startswith("build_")}
    assert record == expected


def _cached_losses(small_moma, data, out, cache):
    trainer = make_trainer(small_moma, data, out, max_steps=4, save_strategy="no", cache_teacher_features=True,
                           cache_views=2, cache_shard_size=16, teacher_feature_cache_dir=str(cache))
    trainer.train_dataset = cache_teacher_outputs(trainer.model, trainer.train_dataset, trainer.data_collator,
                                                  trainer.args, {"teacher": "tiny", "image_size": 64})
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "stream"])
def test_two_processes_build_the_one_process_cache_bit_for_bit(small_moma, nct_mini_dir, tmp_path, streaming):
    extra = ["--streaming"] if streaming else []
    _build_alone(nct_mini_dir, tmp_path / "one", tmp_path / "out-one", *extra)
    launch_two_processes(WORKER, *_worker_args(nct_mini_dir, tmp_path / "two", tmp_path / "out-two", *extra)[1:])
    _assert_same_cache(tmp_path / "two", tmp_path / "one")
    # 129 examples in shards of 16: rank 0 computes shards 0, 2, .. 8 (65 examples), rank 1 shards 1, .. 7 (64).
    assert _forwards(tmp_path / "out-two") == {0: 65 * 2, 1: 64 * 2} and _forwards(tmp_path / "out-one") == {0: 258}
    if not streaming:
        one = _cached_losses(small_moma, nct_mini_dir, tmp_path / "train-one", tmp_path / "one")
        two = _cached_losses(small_moma, nct_mini_dir, tmp_path / "train-two", tmp_path / "two")
        assert len(one) == 4 and one == two


def _wait_for_shards(process: subprocess.Popen, cache: Path, count: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(list(cache.glob("shard-*.arrow"))) < count:
        assert process.poll() is None and time.monotonic() < deadline, "the pass ended before it could be stopped"
        time.sleep(0.05)


def _run_and_stop(command: list[str], cache: Path, ranks: int, stop_rank: int) -> tuple[int, str]:
    """Start `command`, SIGTERM the worker of `stop_rank` once 3 shards are done; `(exit code, output)`."""
    job = subprocess.Popen(command, cwd=REPO, env={**launch_env(), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_shards(job, cache, 3)
        workers = [p for p in psutil.Process(job.pid).children(recursive=True) if str(WORKER) in " ".join(p.cmdline())]
        assert len(workers) == ranks
        rank_of = {p: int(p.environ().get("RANK", "0")) for p in workers}
        target = next(p for p in workers if rank_of[p] == stop_rank)
        target.send_signal(signal.SIGTERM)  # this worker alone: every rank must stop, and the launcher exit 143
        output, _ = job.communicate(timeout=120)
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, output[-4000:]
        return job.returncode, output
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


SMALL_SHARDS = ("--shard_size", 8, "--batch_size", 4)  # 129 examples make 17 shards of 8, the last of 1


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_a_pass_stopped_by_sigterm_exits_143_and_resumes_with_only_the_missing_shards(nct_mini_dir, tmp_path):
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               *_worker_args(nct_mini_dir, cache, tmp_path / "out-1", *SMALL_SHARDS, "--slow", 0.25)]
    code, output = _run_and_stop(command, cache, ranks=1, stop_rank=0)
    assert code == PREEMPTED, output[-4000:]
    assert "Rerun the same command to continue the cache" in output
    kept = {f.name: f.stat().st_mtime_ns for f in cache.glob("shard-*.arrow")}
    assert 3 <= len(kept) < 17 and not (cache / META_FILE).exists()

    _build_alone(nct_mini_dir, cache, tmp_path / "out-2", *SMALL_SHARDS)
    kept_examples = sum(1 if name == "shard-00016.arrow" else 8 for name in kept)
    assert _forwards(tmp_path / "out-2") == {0: 2 * (129 - kept_examples)}  # only the missing shards, both views
    assert kept == {name: (cache / name).stat().st_mtime_ns for name in kept}  # finished shards are never rewritten
    assert not list(cache.glob("*.partial"))  # an abandoned shard's leftover is gone

    _build_alone(nct_mini_dir, tmp_path / "straight", tmp_path / "out-3", *SMALL_SHARDS)
    _assert_same_cache(cache, tmp_path / "straight")


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_sigterm_to_one_of_two_builders_stops_both_and_one_process_finishes_the_same_cache(nct_mini_dir, tmp_path):
    cache = tmp_path / "cache"
    command = launch_command(WORKER, *_worker_args(nct_mini_dir, cache, tmp_path / "out-1", *SMALL_SHARDS,
                                                   "--slow", 0.25)[1:])
    code, output = _run_and_stop(command, cache, ranks=2, stop_rank=1)  # rank 0 learns it at the next round
    assert code == PREEMPTED, output[-4000:]
    assert "Rerun the same command to continue the cache" in output
    kept = {f.name for f in cache.glob("shard-*.arrow")}
    assert 3 <= len(kept) < 17 and not (cache / META_FILE).exists()

    _build_alone(nct_mini_dir, cache, tmp_path / "out-2", *SMALL_SHARDS)  # another process count resumes it
    _build_alone(nct_mini_dir, tmp_path / "straight", tmp_path / "out-3", *SMALL_SHARDS)
    _assert_same_cache(cache, tmp_path / "straight")
