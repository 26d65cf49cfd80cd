"""The caching pass: every process runs the teacher over its share of the shards; a pass resumes where it stopped.

The training set (a stream: its epoch-0 order) is cut into shards of `shard_size` consecutive examples, whatever
the number of processes; process `r` of `N` computes shards `r, r + N, ...` in batches that start at each shard's
start, so the cache built by N processes is the one built by 1 (bit for bit, given the same kernels). A stream is
read whole by every process, which skips the examples of shards it does not own without decoding them.

Each shard is written as `<name>.partial`, then renamed: a shard file is final. A pass that finds shards of its
own run computes only the missing ones; shards of another run raise. `stop_signal` (e.g. a SIGTERM flag) makes a
process abandon its current shard; the processes agree on stopping once per round of N shards (`any_process`),
and then all raise `CacheBuildInterrupted`. After the pass every process waits at `barrier`; the main process
then writes `cache_info.json`, which marks the cache complete.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import numpy as np
import pyarrow as pa
import torch

from .collator import example_key
from .feature_cache import (
    KEY_BYTES,
    META_FILE,
    SCHEMA_KEY,
    SHARD_NAME,
    STORAGE_DTYPES,
    TeacherFeatureCache,
    TeacherForward,
    check_same_run,
    shard_facts,
)


class CacheBuildInterrupted(RuntimeError):
    """The caching pass stopped on request; its finished shards stay, and the same build continues from them."""


@dataclass
class BuildSettings:
    """How the caching pass runs.

    Args:
        batch_size: images per teacher forward (batches never cross a shard's start).
        device: where the teacher runs.
        shard_size: examples per shard file (fixed for a cache: a resumed pass must use the same).
        storage_dtype: "float32", "float16" or "bfloat16" (stored as its raw 16 bits).
        progress: show a progress bar.
        process_index, num_processes: this process and how many build together.
        barrier: waits for every process (needed when `num_processes > 1`).
        stop_signal: this process was asked to stop (checked after every batch).
        any_process: `flag -> bool`, True on every process when any passes True (a collective: all call it
            once per round of `num_processes` shards).
        record: facts written into `cache_info.json` for the record and never checked on reuse, such as the
            hash of the teacher's weights, which a run served by the cache cannot compute (it reads no weights).
    """

    batch_size: int = 64
    device: str | torch.device = "cpu"
    shard_size: int = 4096
    storage_dtype: str = "float32"
    progress: bool = True
    process_index: int = 0
    num_processes: int = 1
    barrier: Callable[[], None] = lambda: None
    stop_signal: Callable[[], bool] = lambda: False
    any_process: Callable[[bool], bool] = bool
    record: dict[str, Any] = field(default_factory=dict)


def _storable(values: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """`values` in the storage dtype, as numpy (bfloat16: its bit patterns as uint16)."""
    if storage_dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return values.to(getattr(torch, storage_dtype)).numpy()


def _nested(values: np.ndarray) -> pa.Array:
    """`(n, V, width)` as a fixed-size list (length V) of fixed-size lists (length width)."""
    _, views, width = values.shape
    flat = pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, width), views)


class _ShardWriter:
    """Collects one shard's keys and outputs batch by batch, then writes it as `<name>.partial` and renames it."""

    def __init__(self, path: Path, facts: dict[str, Any]):
        self.path, self.facts = path, facts
        self.keys: list[bytes] = []
        self.columns: dict[str, list[np.ndarray]] = {"features": [], "logits": []}

    def add(self, keys: list[bytes], outputs: dict[str, np.ndarray]) -> None:
        self.keys.extend(keys)
        for name, values in outputs.items():
            self.columns[name].append(values)

    def finish(self) -> None:
        columns = {"key": pa.array(self.keys, type=pa.binary(KEY_BYTES))}
        columns.update({name: _nested(np.concatenate(parts)) for name, parts in self.columns.items() if parts})
        table = pa.table(columns).replace_schema_metadata({SCHEMA_KEY: json.dumps(self.facts)})
        partial = self.path.with_name(self.path.name + ".partial")
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(partial, self.path)  # atomic: a shard file is always complete


@torch.no_grad()
def _teacher_on_views(teacher_forward: TeacherForward, examples: list[dict], collator,
                      settings: BuildSettings) -> dict[str, np.ndarray]:
    """`{"features": (n, V, d_t), "logits": (n, V, C)}` in the storage dtype: the teacher on each view's crops."""
    outputs: dict[str, list[torch.Tensor]] = {"features": [], "logits": []}
    for view in range(collator.views):
        collator.set_epoch(view)
        batch = collator(examples)
        pixels = batch.get("teacher_pixel_values", batch["pixel_values"]).to(settings.device)
        features, logits = teacher_forward(pixels)
        outputs["features"].append(features.float().cpu())
        if logits is not None:
            outputs["logits"].append(logits.float().cpu())
    return {name: _storable(torch.stack(values, dim=1), settings.storage_dtype)
            for name, values in outputs.items() if values}


def _positions(dataset, shard_size: int, wanted: Callable[[int], bool]) -> Iterator[tuple[int, dict | None]]:
    """`(position, example)` in training-set order. A map-style shard that is not `wanted` yields only its first
    position, with None; a stream yields every example (unwanted ones are passed over, never decoded)."""
    if isinstance(dataset, datasets.Dataset):
        for shard in range(math.ceil(len(dataset) / shard_size)):
            start = shard * shard_size
            if not wanted(shard):
                yield start, None
                continue
            for position in range(start, min(start + shard_size, len(dataset))):
                yield position, dataset[position]
        return
    dataset.set_epoch(0)  # the order EndlessStream trains epoch 0 in
    yield from enumerate(dataset)


def _complete_shards(path: Path, facts: dict[str, Any]) -> set[int]:
    """Indices of the finished shards in `path`; raises when one was written for another run."""
    done = set()
    for file in path.glob(SHARD_NAME.replace("{:05d}", "*")):
        check_same_run(shard_facts(file), facts, path, what="partial cache")
        done.add(int(file.stem.split("-")[1]))
    return done


def _compute_my_shards(teacher_forward: TeacherForward, dataset, collator, path: Path, facts: dict[str, Any],
                       settings: BuildSettings) -> int:
    """Write this process's missing shards; returns the number of examples in the training set."""
    from tqdm.auto import tqdm

    size, count = settings.shard_size, settings.num_processes
    complete = _complete_shards(path, facts)

    def mine(shard: int) -> bool:
        return shard % count == settings.process_index and shard not in complete

    bar = tqdm(desc=f"Caching teacher features (process {settings.process_index})", unit="image",
               disable=not settings.progress)
    writer, pending, stopping, num_examples = None, [], False, 0

    def flush():
        if writer is not None and pending:
            writer.add([example_key(example["image"]) for example in pending],
                       _teacher_on_views(teacher_forward, pending, collator, settings))
            bar.update(len(pending))
        pending.clear()

    for position, example in _positions(dataset, size, mine):
        num_examples = position + 1
        if position % size == 0:  # a shard starts: finish the last one, and agree on stopping at each round
            flush()
            if writer is not None:
                writer.finish()
            shard = position // size
            stopping = stopping or settings.stop_signal()
            if shard and shard % count == 0 and settings.any_process(stopping):
                raise CacheBuildInterrupted(f"stopped before shard {shard}")
            writer = _ShardWriter(path / SHARD_NAME.format(shard), facts) if mine(shard) and not stopping else None
        if writer is None:
            continue
        pending.append(example)
        if len(pending) == settings.batch_size:
            flush()
            if settings.stop_signal():
                stopping, writer = True, None  # abandon this shard: a later pass computes it again
    flush()
    if writer is not None:
        writer.finish()
    bar.close()
    if settings.any_process(stopping):
        raise CacheBuildInterrupted("stopped in the last round")
    if isinstance(dataset, datasets.Dataset):
        num_examples = len(dataset)
    return num_examples


def _finalise(path: Path, facts: dict[str, Any], num_examples: int, settings: BuildSettings, started: float):
    """Main process, after every process's pass: check that every shard is there, then write `cache_info.json`."""
    num_shards = math.ceil(num_examples / settings.shard_size)
    missing = [i for i in range(num_shards) if not (path / SHARD_NAME.format(i)).exists()]
    if missing:
        raise RuntimeError(f"The caching pass ended without shards {missing[:10]} in {path}.")
    for stale in [*path.glob("*.partial"), *(path / SHARD_NAME.format(i) for i in _complete_shards(path, facts)
                                            if i >= num_shards)]:
        stale.unlink()  # a pass that stopped mid-shard, or shards past the end of data that has shrunk
    info = {**settings.record, **facts, "num_rows": num_examples, "num_shards": num_shards,
            "build_processes": settings.num_processes,
            "build_seconds": round(time.perf_counter() - started, 2)}  # the last two: facts for the record only
    partial = path / (META_FILE + ".partial")
    partial.write_text(json.dumps(info, indent=2))
    os.replace(partial, path / META_FILE)


def build_feature_cache(teacher_forward: TeacherForward, dataset, collator, path: str | Path,
                        info: dict[str, Any], settings: BuildSettings | None = None) -> TeacherFeatureCache:
    """Run `teacher_forward` over `collator.views` views of every example of `dataset`; write and open the cache.

    Call it on every process with the same arguments (and `settings` naming the process): each computes its
    shards, then all open the complete cache. Shards already in `path` for the same run are kept.

    Args:
        teacher_forward: `pixel_values (B, 3, H, W) -> (features (B, d_t), logits (B, C_t) or None)` of the
            frozen teacher, already in eval mode on `settings.device`.
        dataset: the map-style training set (with its `_row` column, see `add_row_index`) or a stream.
        collator: a `PatchCollator` with views set (`set_views`) and no cache; its `teacher_pixel_values` (or
            `pixel_values`) are fed.
        path: the cache folder (created).
        info: what the cache must match when reused (see `feature_cache.expected_info`), stored in it.
        settings: batch size, device, shard size, storage dtype and the processes (default: one, on the CPU).

    Raises:
        CacheBuildInterrupted: `settings.stop_signal` asked to stop; the finished shards stay.
        ValueError: `path` holds shards of another run.
    """
    settings = settings or BuildSettings()
    if not collator.views or collator.feature_cache is not None:
        raise ValueError("Building a teacher-feature cache needs a collator with fixed views and no cache of its own.")
    for name, value in (("storage_dtype", settings.storage_dtype), ("seed", collator.seed)):
        if info.get(name, value) != value:
            raise ValueError(f"The cache is to record {name} {info[name]!r}, but the build uses {value!r}.")
    if settings.storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"The cache stores {', '.join(STORAGE_DTYPES)}, not {settings.storage_dtype!r}.")
    started = time.perf_counter()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    facts = {**info, "seed": collator.seed, "storage_dtype": settings.storage_dtype, "views": collator.views,
             "streaming": not isinstance(dataset, datasets.Dataset), "shard_size": settings.shard_size}
    num_examples = _compute_my_shards(teacher_forward, dataset, collator, path, facts, settings)
    settings.barrier()
    if settings.process_index == 0:
        _finalise(path, facts, num_examples, settings, started)
    settings.barrier()
    return TeacherFeatureCache(path)

