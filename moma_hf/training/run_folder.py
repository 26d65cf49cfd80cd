"""The rule for an `--output_dir` that already holds files: never mix two runs in one folder.

A finished run's folder (its exported student) or an interrupted run's folder (`checkpoint-*`, no student) is
refused, unless the run resumes from a checkpoint inside it (`--resume_from_checkpoint`) or asks to start afresh
(`--overwrite_output_dir`). Overwriting deletes every earlier output (checkpoints, student, card, plots, logs)
before anything is written, so `--push_to_hub` can only ever upload one run. A teacher-feature cache is not a
run output: it is kept, and checked against the new run when used (see `feature_cache.py`). A folder that holds
files but nothing a run writes is refused even with `--overwrite_output_dir`: it is probably not a run folder.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..data.feature_cache import DEFAULT_DIR as FEATURE_CACHE_DIR
from .fault_tolerance import checkpoint_folders, last_complete_checkpoint

# Entries a run writes into output_dir; any of them marks the folder as a run folder.
RUN_OUTPUTS = frozenset({
    "runs", "config.json", "model.safetensors", "training_args.json", "training_args.bin",
    "trainer_state.json", "train_results.json", "eval_results.json", "all_results.json", "README.md",
    "training_curves.png", "confusion_matrix.png", "preprocessor_config.json",
})
# Entries that are not outputs of one run and survive --overwrite_output_dir.
KEPT = frozenset({FEATURE_CACHE_DIR})


@dataclass
class OutputDirArguments:
    """What to do with an `--output_dir` that holds an earlier run (transformers 5 dropped this flag)."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete the earlier run in --output_dir (checkpoints, student, card, plots, "
                                 "logs; a teacher-feature cache is kept) before training."}
    )


class OutputDirInUseError(ValueError):
    """`output_dir` holds an earlier run and the user neither resumes it nor asked to overwrite it."""


def check_output_dir(args, overwrite: bool = False) -> None:
    """Raise when `args.output_dir` holds an earlier run that this one would be mixed with; deletes nothing.

    Call it first, so a refusal comes before minutes of loading; `prepare_output_dir` clears the folder later.

    Args:
        args: `TrainingArguments` (`output_dir`, `resume_from_checkpoint`).
        overwrite: the user's `--overwrite_output_dir`.

    Raises:
        OutputDirInUseError: the folder holds a run and the user neither resumes it nor overwrites it (the
            message gives both commands), or it holds files no run wrote (never deleted).
        ValueError: `overwrite` would delete the checkpoint the run resumes from.
    """
    folder = Path(args.output_dir)
    resumes_here = _inside(args.resume_from_checkpoint, folder)
    if overwrite and resumes_here:
        raise ValueError(
            f"--overwrite_output_dir would delete {args.resume_from_checkpoint}, the checkpoint you resume from. "
            "Drop --overwrite_output_dir to continue that run, or drop --resume_from_checkpoint to start afresh."
        )
    entries = earlier_outputs(folder)
    if not entries or resumes_here:
        return
    if not entries & RUN_OUTPUTS and not checkpoint_folders(folder):  # complete or not, a run wrote them
        raise OutputDirInUseError(
            f"--output_dir {folder} holds files that no run wrote ({', '.join(sorted(entries)[:5])}). A run deletes "
            "only folders it recognises; pick a new or empty --output_dir."
        )
    if not overwrite:
        raise OutputDirInUseError(_refusal(folder))


def prepare_output_dir(args, overwrite: bool = False) -> None:
    """`check_output_dir`, then, with `overwrite`, delete the earlier run's outputs; call it before any write.

    Every process checks (so all refuse alike); the processes that save (`args.should_save`) delete, before the
    others go on (`args.main_process_first`).
    """
    check_output_dir(args, overwrite)
    if not overwrite:
        return
    with args.main_process_first(local=args.save_on_each_node, desc="clearing output_dir"):
        if args.should_save:
            for name in earlier_outputs(Path(args.output_dir)):
                _delete(Path(args.output_dir) / name)


def earlier_outputs(folder: Path) -> set[str]:
    """The entries of `folder` that belong to an earlier run (everything but a teacher-feature cache)."""
    if not folder.is_dir():
        return set()
    return {name for name in os.listdir(folder) if name not in KEPT}


def _refusal(folder: Path) -> str:
    last = _checkpoints(folder)
    if (folder / "config.json").exists():
        state = "a finished run (its exported student, config.json)"
    elif last:
        state = f"an interrupted run ({Path(last).name}, no exported student)"
    else:
        state = "an earlier run's files (no checkpoint to resume from)"
    resume = f"add --resume_from_checkpoint {last} to continue it, or " if last else ""
    return (
        f"--output_dir {folder} holds {state}; this run would mix its files with that one's. Give the same command "
        f"and {resume}add --overwrite_output_dir to delete that run first (a teacher-feature cache is kept), or "
        "pick a new --output_dir."
    )


def _checkpoints(folder: Path) -> str | None:
    # Only a complete checkpoint can be resumed (fault_tolerance.is_complete_checkpoint).
    return last_complete_checkpoint(folder)


def _inside(path, folder: Path) -> bool:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        return False
    return Path(path).resolve().is_relative_to(folder.resolve())


def _delete(path: Path) -> None:
    # Another node's main process may be clearing the same shared folder: a vanished entry is fine.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def unfinished_run_flags(folder: str | os.PathLike) -> list[str]:
    """Flags that take up an unfinished run in `folder` again: resume from its last checkpoint when it has one,
    else start afresh over whatever it left (`--overwrite_output_dir`; harmless for a new folder)."""
    last = _checkpoints(Path(folder))
    return [f"--resume_from_checkpoint={last}"] if last else ["--overwrite_output_dir=true"]
