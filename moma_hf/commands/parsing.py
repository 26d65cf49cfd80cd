"""Command-line parsing for the jobs: `HfArgumentParser` flags, with a YAML `--config` file as defaults."""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..training.token_safety import warn_if_token_in_arguments

DATA_FLAGS = ("--dataset_name", "--train_dir")


def parse_args(dataclass_types: tuple, argv: list[str] | None = None, default_config: Path | None = None):
    """Parse CLI flags, with `--config file.yaml` (or `--config=file.yaml`) as defaults that explicit flags override.

    Without `--config` and without any training data flag, `default_config` (the bundled demo) gives the
    defaults, so `distill.py --max_steps 20` runs the demo for 20 steps. Flags must be spelled out in full
    (no argparse prefix matching: `--learning_rat` is an error, not `--learning_rate`), and so must YAML keys.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {a.split("=")[0] for a in argv}
    if default_config is not None and "--config" not in flags and not flags & set(DATA_FLAGS):
        argv = ["--config", str(default_config), *argv]
    if "--config" in {a.split("=")[0] for a in argv}:
        config_path, rest = _pop_config_flag(argv)
        argv = _yaml_to_flags(config_path, _field_names(dataclass_types)) + rest
    warn_if_token_in_arguments(argv)  # the flags of the YAML file are in argv by now
    return HfArgumentParser(dataclass_types, allow_abbrev=False).parse_args_into_dataclasses(args=argv)


def _pop_config_flag(argv: list[str]) -> tuple[Path, list[str]]:
    """`(the path given to --config, argv without it)`, for `--config PATH` and `--config=PATH` alike."""
    index = next(i for i, a in enumerate(argv) if a.split("=")[0] == "--config")
    if "=" in argv[index]:
        return Path(argv[index].split("=", 1)[1]), argv[:index] + argv[index + 1 :]
    if index + 1 == len(argv) or argv[index + 1].startswith("--"):
        raise ValueError("--config needs the path of a YAML file: --config run.yaml")
    return Path(argv[index + 1]), argv[:index] + argv[index + 2 :]


def _field_names(dataclass_types: tuple) -> set[str]:
    """The flag names of the dataclasses' fields without '--', their aliases (`attention_heads`) included."""
    names = set()
    for t in dataclass_types:
        for f in fields(t):
            if f.init:
                aliases = f.metadata.get("aliases", [])
                names |= {f.name, *(a.lstrip("-") for a in ([aliases] if isinstance(aliases, str) else aliases))}
    return names


def check_streaming_has_max_steps(data_args, training_args) -> None:
    """`--streaming` needs `--max_steps`: a stream has no length to derive the number of steps from. Every job
    that takes `DataArguments` and `TrainingArguments` calls this right after parsing."""
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps: a stream has no length to derive the number of steps from.")


def _yaml_to_flags(path: Path, known: set[str]) -> list[str]:
    """The flags a YAML file of `flag_name: value` pairs stands for; raise naming the file for anything else."""
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"The config file {path} holds a {type(values).__name__}; it must hold a mapping of flag "
                         "names to values, one per line, such as 'learning_rate: 0.05'.")
    unknown = [key for key in values if str(key).replace("-", "_") not in known]
    if unknown:
        hints = {key: difflib.get_close_matches(str(key), sorted(known), n=1) for key in unknown}
        named = ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items())
        raise ValueError(f"The config file {path} has unknown keys: {named}. Its keys are the script's flag names "
                         "without '--'; see --help.")
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)) and key not in ("report_to",):
            value = json.dumps(value)
        if isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags
