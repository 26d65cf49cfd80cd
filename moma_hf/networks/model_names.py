"""Tell a local path from a Hub id, and say at once why a model name resolves to neither.

huggingface_hub retries a refused connection five times (about 25 s) before it gives up, and its
`LocalEntryNotFoundError` subclasses `EntryNotFoundError`, so "the Hub cannot be reached" easily reads as "the
repo has no such file". :func:`check_hub_model` asks the endpoint once, without retries, before any download.
"""

from __future__ import annotations

import logging
import os

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from ..data.sources import looks_like_local_path  # data sources and models share the Hub's naming

logger = logging.getLogger(__name__)
# A closed port answers at once; a black-holed network would otherwise hang for the OS's TCP timeout.
_PROBE_TIMEOUT_S = 10.0


class ModelLoadError(ValueError):
    """A model name is neither a loadable local folder nor a reachable Hub repo; the message says what to do."""


def hub_unreachable_reason() -> str | None:
    """None when the Hub endpoint answers (any HTTP status); otherwise why it cannot be reached."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set, so nothing is downloaded"
    try:
        get_session().head(constants.ENDPOINT, timeout=_PROBE_TIMEOUT_S, follow_redirects=False)
    except Exception as error:  # noqa: BLE001 - httpx transport errors, proxies and SSL all mean "unreachable"
        return f"{constants.ENDPOINT} did not answer ({type(error).__name__}: {error})"
    return None


def check_hub_model(repo: str, revision: str, token: str | bool | None, what: str, revision_flag: str,
                    error: type[ModelLoadError] = ModelLoadError) -> None:
    """Check that `repo` is a local folder, or a Hub model repo with a config.json at `revision`; raise `error`
    with a message naming `what` ("Teacher ...") and the fix otherwise.

    A repo already in the local cache passes when the Hub cannot be reached (set HF_HUB_OFFLINE=1 to load it
    without network calls).
    """
    if os.path.isdir(repo):
        return
    if looks_like_local_path(repo):
        raise error(f"{what} {repo!r} looks like a local path, but this folder does not exist (relative to "
                    f"{os.getcwd()}). Check the path; a Hub id has the form 'org/name'.")
    where = f"{repo!r} (revision {revision!r})"
    reason = hub_unreachable_reason()
    if reason is not None:
        if isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
            logger.warning("The Hub cannot be reached (%s); loading %s from the local cache.", reason, repo)
            return
        raise error(f"{what} {where} is not a local folder and not in the local cache, and the Hub cannot be "
                    f"reached: {reason}. Check your connection or HF_ENDPOINT, download it once where the Hub is "
                    f"reachable (`hf download {repo}`), or pass a local folder.")
    _download_config(repo, revision, token, what, revision_flag, error)


def _download_config(repo, revision, token, what, revision_flag, error) -> None:
    """Fetch config.json, turning the Hub's typed errors into messages that say what to do."""
    where = f"{repo!r} (revision {revision!r})"
    try:
        hf_hub_download(repo, "config.json", revision=revision, token=token)
    except GatedRepoError as err:
        raise error(f"{what} {where} is gated. Request access on its Hub page, {constants.ENDPOINT}/{repo}, then "
                    "set HF_TOKEN to a read token of the account that was granted access (or run `hf auth login`), "
                    "and run again.") from err
    except RevisionNotFoundError as err:
        raise error(f"{what} {repo!r} has no revision {revision!r}: check {revision_flag}.") from err
    except RepositoryNotFoundError as err:
        raise error(f"{what} {where} does not exist on the Hub and is not a local folder. Check the id (timm "
                    "models: 'timm/<name>' or 'hf-hub:<org>/<name>'); for a private repo, log in with "
                    "`hf auth login`.") from err
    except LocalEntryNotFoundError as err:  # before EntryNotFoundError, which it subclasses
        raise error(f"{what} {where} is not in the local cache and the Hub stopped answering ({err}). Check "
                    "your connection or HF_ENDPOINT, or pass a local folder.") from err
    except EntryNotFoundError as err:
        raise error(f"{what} {where} has no config.json, so it is not a transformers or timm model "
                    "repo.") from err
