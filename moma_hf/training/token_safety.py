"""Keeping the Hub token out of everything a run writes or prints.

`TrainingArguments.to_dict` (and so `training_args.json`, TensorBoard's hparams and `str(args)`) already redacts
every `*_token` field, but the Trainer also pickles the arguments into every `checkpoint-*/training_args.bin`
(and into `output_dir` for a plain Trainer), and a dataclass subclass regains a `repr` that prints them.
`TokenSafeArgumentsMixin` closes both: any pickle of the arguments holds `None` for their token fields, and
`repr` is the redacted one. Unpickled arguments therefore need the token from `HF_TOKEN` or `hf auth login`,
which is where it belongs; in-memory copies (`copy.copy`, `copy.deepcopy`) keep it.
"""

from __future__ import annotations

import copy
import logging
import os

logger = logging.getLogger(__name__)
_warned = False


def token_fields(args) -> list[str]:
    """Names of the attributes of `args` that hold a secret (the Trainer's rule: the name ends in `_token`)."""
    return [name for name in vars(args) if name.endswith("_token")]


class TokenSafeArgumentsMixin:
    """Put first among the bases of a `TrainingArguments` dataclass, declared with `@dataclass(repr=False)`.

    Pickling (`torch.save`, `pickle.dumps`) writes `None` for every `*_token` field; `repr` is
    `TrainingArguments.__str__`, which redacts them. Copies made in memory keep the token.
    """

    def __getstate__(self) -> dict:
        state = dict(vars(self))
        for name in token_fields(self):
            state[name] = None
        return state

    def __copy__(self):
        clone = self.__class__.__new__(self.__class__)
        vars(clone).update(vars(self))
        return clone

    def __deepcopy__(self, memo: dict):
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        vars(clone).update(copy.deepcopy(vars(self), memo))
        return clone

    def __repr__(self) -> str:
        return str(self)


def warn_if_token_in_arguments(argv: list[str]) -> None:
    """Warn once, on the main process, when `--hub_token` is among the flags (given directly or by a YAML config).

    `accelerate launch` prints the child's whole command line when a run fails, so a token given as a flag ends
    up in job logs. The warning never contains the token.
    """
    global _warned
    if _warned or int(os.environ.get("RANK", "0")) != 0:
        return
    if any(arg == "--hub_token" or arg.startswith("--hub_token=") for arg in argv):
        _warned = True
        logger.warning(
            "--hub_token was given as a flag (on the command line or in a --config YAML file). `accelerate launch` "
            "prints the full command line when a run fails, and shell history and YAML files are easily shared, "
            "so the token can leak from there. Prefer `hf auth login` once per machine, or export HF_TOKEN for "
            "the job, and drop --hub_token: the Hub clients pick the token up from either."
        )
