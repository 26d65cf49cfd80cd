"""Sharing the distilled student on the Hub, without ever losing the local result to a failed upload."""

from __future__ import annotations


class HubPushError(RuntimeError):
    """The upload failed; the exported student is still complete in `output_dir`."""


def push_student(trainer, commit_message: str) -> str:
    """Push `trainer.args.output_dir` (student, processor, card, results) to `trainer.hub_model_id`.

    Returns the commit URL. Any failure (network, authentication, quota) raises `HubPushError` naming the
    repository, the folder that still holds everything, and the command that retries the upload. The token
    never appears in the message.
    """
    output_dir = trainer.args.output_dir
    try:
        return trainer.push_to_hub(commit_message=commit_message)
    except Exception as err:  # httpx, HfHubHTTPError, OSError...: the advice is the same for all of them
        repo_id = trainer.hub_model_id or trainer.args.hub_model_id or "<your-namespace>/<model-name>"
        raise HubPushError(
            f"Uploading the student to the Hub repo {repo_id} failed ({type(err).__name__}: {err}). Nothing local "
            f"was lost: the student, its processor, model card and results are complete in {output_dir}. Retry "
            f"the upload alone (no retraining) with:\n    hf upload {repo_id} {output_dir} . --repo-type model\n"
            "after `hf auth login` (or with HF_TOKEN set) if the error was 401/403."
        ) from err
