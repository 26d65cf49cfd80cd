"""Sharing the distilled student on the Hub, without ever losing the local result to a failed upload.

- `check_push_access` runs before training: it creates (or finds) the repo and checks that the credentials may
  write to it, so a bad token or an unreachable Hub fails in seconds, not after the run.
- `push_student` uploads `output_dir` minus `PUSH_IGNORE_PATTERNS`; when the upload fails, its message gives
  the `hf upload` command that uploads exactly the same files.
"""

from __future__ import annotations

import shlex
from pathlib import Path

# What never leaves the machine. `Trainer.push_to_hub` (transformers 5) ignores "_*" and "checkpoint-*": the
# checkpoints (complete or cut short by a crash) hold the optimiser and, for a momentum teacher or a checkpoint
# written before frozen teachers were named instead of stored, the teacher's weights; "_*" the
# teacher-feature cache. Added here: the Trainer's pickled arguments (pickles are unsafe to load; exports carry
# training_args.json instead).
PUSH_IGNORE_PATTERNS = ("_*", "checkpoint-*", "training_args.bin")


class HubPushError(RuntimeError):
    """The upload failed; the exported student is still complete in `output_dir`."""


class HubAccessError(RuntimeError):
    """Before training: the push repo cannot be created or written with the current credentials."""


def push_repo_name(args) -> str:
    """The repo `--push_to_hub` writes to: `--hub_model_id`, else the name of `--output_dir` (as the Trainer does)."""
    return args.hub_model_id or Path(args.output_dir).absolute().name


def check_push_access(args) -> str | None:
    """Create `push_repo_name(args)` if needed and check that the credentials may write to it.

    Call before building the Trainer (whose constructor already calls the Hub) and before any training, on
    every process; only the main one asks the Hub. Returns the full repo id there, None elsewhere or without
    `--push_to_hub`. Raises `HubAccessError` naming the repo and the fix (never the token) when the Hub cannot be
    reached (or HF_HUB_OFFLINE is set), no token is found, the token is rejected (401), or it may not write (403).
    """
    if not args.push_to_hub or args.process_index != 0:
        return None
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    name, token = push_repo_name(args), args.hub_token
    where = f"the Hub repo {name!r} at {constants.ENDPOINT}"
    if token is None and get_token() is None:
        raise HubAccessError(f"--push_to_hub needs a Hub token with write access to {where}, and none was found. "
                             "Run `hf auth login` once on this machine, or set HF_TOKEN for the job.")
    api = HfApi(endpoint=constants.ENDPOINT)
    try:
        repo_id = api.create_repo(name, token=token, private=args.hub_private_repo, exist_ok=True).repo_id
        api.auth_check(repo_id, write=True, token=token)
    except HFValidationError as err:
        message = f"{name!r} is not a valid repo id ({err}); pass --hub_model_id <namespace>/<name>."
        raise HubAccessError(message) from err
    except HfHubHTTPError as err:
        raise HubAccessError(_http_failure(where, err.response.status_code, err.server_message, token)) from err
    except Exception as err:  # noqa: BLE001 - connection refused, DNS, TLS, timeouts, offline mode: one advice
        raise HubAccessError(
            f"Cannot reach {where} to check that the run can push there ({type(err).__name__}: "
            f"{_scrub(str(err), token)}). Check the network, proxy and HF_ENDPOINT (and unset HF_HUB_OFFLINE), or "
            "drop --push_to_hub: the run writes everything to --output_dir, and the upload can follow later."
        ) from err
    return repo_id


def _http_failure(where: str, status: int, server_message: str | None, token: str | None) -> str:
    said = f" (the Hub said: {_scrub(server_message, token)})" if server_message else ""
    if status == 401:
        return (f"The Hub rejected the token for {where} (401){said}: it is invalid, expired or revoked. Run "
                "`hf auth login` with a valid write token, or set HF_TOKEN to one (and drop --hub_token).")
    if status == 403:
        return (f"The token may not write to {where} (403){said}. Use a token with write access to that "
                "namespace (a 'write' token, or a fine-grained one with write access to its repos), or push to "
                "a namespace you own with --hub_model_id <your-name>/<model-name>.")
    return f"The Hub refused to create or check {where} (HTTP {status}){said}. Fix this before training."


def _scrub(text: str, token: str | None) -> str:
    """`text` with `token` masked: server and library messages are not ours to trust."""
    return text.replace(token, "<hub_token>") if token else text


def push_student(trainer, commit_message: str) -> str:
    """Upload `trainer.args.output_dir` (student, processor, card, results), minus `PUSH_IGNORE_PATTERNS`.

    The repo is `trainer.hub_model_id`, which the Trainer sets when `--push_to_hub` is on. Returns the commit URL.
    Any failure (network, authentication, quota) raises `HubPushError` naming the repository, the folder that
    still holds everything, and the `hf upload` command that uploads exactly these files. The token never
    appears in the message.
    """
    from huggingface_hub import HfApi, constants

    args = trainer.args
    repo_id = trainer.hub_model_id or args.hub_model_id or push_repo_name(args)
    try:
        return HfApi(endpoint=constants.ENDPOINT).upload_folder(
            repo_id=repo_id, folder_path=args.output_dir, commit_message=commit_message, token=args.hub_token,
            revision=args.hub_revision, ignore_patterns=list(PUSH_IGNORE_PATTERNS),
        )
    except Exception as err:  # httpx, HfHubHTTPError, OSError...: the advice is the same for all of them
        raise HubPushError(
            f"Uploading the student to the Hub repo {repo_id} failed ({type(err).__name__}: "
            f"{_scrub(str(err), args.hub_token)}). Nothing local was lost: the student, its processor, model card "
            f"and results are complete in {args.output_dir}. Retry the upload alone (no retraining) with:\n    "
            f"{retry_command(repo_id, args.output_dir, commit_message, args.hub_revision)}\nafter `hf auth login` "
            "(or with HF_TOKEN set) if the error was 401/403."
        ) from err


def retry_command(repo_id: str, output_dir: str, commit_message: str, revision: str | None = None) -> str:
    """The `hf upload` command line that uploads what `push_student` uploads (shell-quoted)."""
    words = ["hf", "upload", repo_id, str(output_dir), ".", "--repo-type", "model"]
    for pattern in PUSH_IGNORE_PATTERNS:
        words += ["--exclude", pattern]
    if revision:
        words += ["--revision", revision]
    words += ["--commit-message", commit_message]
    return shlex.join(words)
