"""`--cache_teacher_features` in `moma-distill`: what the cache must match, finding a ready one, building it.

`main()` calls, in this order:

1. `facts = cache_facts(args, data_args, image_size)`: what the cached crops depend on besides the data;
2. `find_ready_cache(train_dataset, collator, args, facts)`: True when a complete cache for this very run is on
   disk, so the teacher's weights need not be loaded at all;
3. `train_dataset = cache_teacher_outputs(model, train_dataset, collator, args, facts)`: builds the cache when
   needed (every process computes its share of the shards) and makes `collator` read it.

SIGTERM during the caching pass stops it cleanly on every process (finished shards stay) and ends the job with
exit code 143 and a message: rerun the same command, and the pass continues from the finished shards.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from moma_hf.configuration_distillation import TeacherUpdate
from moma_hf.data.feature_cache import DEFAULT_DIR, attach_feature_cache, expected_info, find_complete_cache
from moma_hf.data.feature_cache_build import BuildSettings, CacheBuildInterrupted
from moma_hf.training.launcher import (
    PREEMPTED_EXIT_CODE,
    follow_launcher,
    notify_launcher,
    reroute_orphaned_output,
)

logger = logging.getLogger(__name__)


class CachePassPreempted(SystemExit):
    """SIGTERM stopped the caching pass: exits the job with code 143; the same command continues the cache."""


def cache_dir(args) -> Path:
    """The cache folder: `--teacher_feature_cache_dir`, else `OUTPUT_DIR/_teacher-feature-cache`."""
    return Path(args.teacher_feature_cache_dir or Path(args.output_dir) / DEFAULT_DIR)


def cache_facts(args, data_args, image_size: int) -> dict:
    """What the cached crops and outputs depend on besides the data's rows, checked whenever the cache is reused.

    A stream has no fingerprint, so its source (dataset or folder, split, shuffle) is named here; every streamed
    example is then also checked by its key when it is looked up.
    """
    facts = {"teacher": args.teacher_model_name_or_path, "teacher_revision": args.teacher_model_revision,
             "teacher_dtype": args.teacher_dtype, "image_size": image_size,
             "randaugment": data_args.randaugment, "stain_jitter": data_args.stain_jitter}
    if data_args.streaming:
        facts["stream"] = {name: getattr(data_args, name) for name in (
            "dataset_name", "dataset_config_name", "dataset_revision", "train_dir", "train_split",
            "unlabeled_dir", "unlabeled_dataset_name", "unlabeled_dataset_revision", "labeled_fraction")}
    return facts


def _expected(train_dataset, collator, args, facts: dict) -> dict:
    return expected_info(train_dataset, collator.seed, args.cache_views, facts, args.cache_dtype)


def find_ready_cache(train_dataset, collator, args, facts: dict) -> bool:
    """True when a complete cache that fits this run is on disk: the run then needs no teacher weights.

    Raises:
        ValueError: the complete cache at the cache folder was built for another run.
    """
    return find_complete_cache(cache_dir(args), _expected(train_dataset, collator, args, facts)) is not None


def _any_process(flag: bool, device) -> bool:
    """True on every process when `flag` is True on any (an all-reduce; plain `flag` without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value)
    return value.item() > 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextmanager
def _stop_on_sigterm():
    """A flag set by SIGTERM for the duration (as in training: see `StepGuard`), read through the yielded callable."""
    received = threading.Event()

    def on_sigterm(signum, frame):
        received.set()
        reroute_orphaned_output()  # the signal may say that the launcher, which read our stderr, has died

    if threading.current_thread() is not threading.main_thread():  # handlers are for the main thread alone
        yield received.is_set
        return
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    follow_launcher()  # a launcher that dies sends us SIGTERM: stop the pass cleanly rather than as an orphan
    try:
        yield received.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)


def cache_teacher_outputs(model, train_dataset, collator, args, facts: dict):
    """`--cache_teacher_features`: the training set (map-style: with its `_row` column), `collator` reading the cache.

    Call it on every process. When the cache is complete it only attaches it (`model.teacher` may then be None);
    otherwise every process runs the model's frozen teacher over its share of the shards. Either way the model's
    config takes the hash of the weights that built the cache (recorded in `cache_info.json`), so checkpoints
    name that teacher and `from_pretrained` checks it.

    Raises:
        ValueError: no frozen teacher to build with, or a cache built for another run.
        CachePassPreempted: SIGTERM stopped the pass (a `SystemExit` with code 143, after the message to rerun).
    """
    path = cache_dir(args)
    if getattr(model, "teacher_update", TeacherUpdate.FROZEN) != TeacherUpdate.FROZEN:
        raise ValueError("--cache_teacher_features needs a frozen teacher: a momentum teacher changes every step. "
                         "Use --teacher_update frozen.")
    forward = None
    if not find_ready_cache(train_dataset, collator, args, facts):
        if model.teacher is None:
            raise ValueError("--cache_teacher_features needs a frozen teacher to build the cache, and this model has "
                             "none (`ce` distils no teacher).")
        model.teacher.eval().to(args.device)
        forward = model.teacher_outputs
    with _stop_on_sigterm() as stop_signal:
        settings = BuildSettings(
            batch_size=args.per_device_train_batch_size, device=args.device, shard_size=args.cache_shard_size,
            storage_dtype=args.cache_dtype, progress=not args.disable_tqdm, process_index=args.process_index,
            num_processes=args.world_size, barrier=_barrier, stop_signal=stop_signal,
            any_process=lambda flag: _any_process(flag, args.device),
            record={"teacher_weights_sha256": model.config.teacher_weights_sha256},
        )
        try:
            train_dataset = attach_feature_cache(train_dataset, collator, forward, path, args.cache_views, facts,
                                                 settings)
            # A run served by the cache read no weights: its checkpoints name the hash of the teacher that built it.
            model.config.teacher_weights_sha256 = collator.feature_cache.info.get("teacher_weights_sha256")
            return train_dataset
        except CacheBuildInterrupted:
            if args.process_index == 0:
                logger.warning(f"Stopped by SIGTERM during the teacher-feature caching pass; the finished shards "
                               f"are kept in {path}. Rerun the same command to continue the cache from them.")
            notify_launcher()  # so that `accelerate launch` exits 143 too, not 1 (see moma_hf/training/launcher.py)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()  # leave together (see distill.main's end)
            raise CachePassPreempted(PREEMPTED_EXIT_CODE) from None
