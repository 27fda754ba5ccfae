"""The Hugging Face Hub: names that travel (local folders resolved), a fast "unreachable", and uploads (HfApi).

A model or dataset named by a local folder is stored resolved (absolute) in the manifests and
model configs that record it, so an artifact works from any folder. A name that is no local
folder is a Hub id; when it is not in the local cache and the Hub cannot be reached
(HF_HUB_OFFLINE, or no connection within a few seconds) loading fails at once, in one line,
instead of after the client's ~55 s of retries.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


class HubUnavailableError(OSError):
    """A name that is no local folder, not in the Hub cache, while the Hub cannot be reached (an OSError:
    the loaders report it as they report any model that does not load)."""


def local_or_name(name: str | None) -> str | None:
    """A local folder -> its absolute path; a Hub id (or None) unchanged."""
    if name and os.path.isdir(os.path.expanduser(name)):
        return str(Path(name).expanduser().resolve())
    return name


@functools.lru_cache(maxsize=1)
def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (None: it can, or a proxy decides)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"no connection to {host}:{port} ({err.strerror or type(err).__name__})"
    return None


def _cached(repo_id: str, repo_type: str) -> bool | None:
    """Whether the local Hub cache holds the repo (None: not a valid repo id, so it was meant as a folder)."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    folder = Path(os.environ.get("HF_HUB_CACHE", HF_HUB_CACHE)) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    return (folder / "snapshots").is_dir()


def check_reachable(name: str, repo_type: str = "model") -> None:
    """Raise HubUnavailableError at once for a name that is neither a local folder nor loadable from the Hub
    (its cache or the Hub itself); nothing for a local folder, a cached repo or a reachable Hub."""
    if os.path.isdir(os.path.expanduser(name)):
        return
    cached = _cached(name, repo_type)
    here = f"no folder {name!r} in {os.getcwd()}"
    if cached is None:
        raise HubUnavailableError(f"{here} (and {name!r} is no Hugging Face {repo_type} id)")
    if cached:
        return
    why = _hub_unreachable()
    if why:
        raise HubUnavailableError(f"{here}, and the Hugging Face Hub is unreachable ({why}) for a {repo_type} "
                                  f"named {name!r}: give the folder's path")

# Never uploaded: a training checkpoint's optimizer/RNG state and half-written save folders.
IGNORE_PATTERNS = ["training_state/*", "training_state/**", ".*"]


def upload_artifact(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                    commit_message: str | None = None) -> str:
    """Create the model repo if needed and upload the folder; returns the repo id."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=IGNORE_PATTERNS,
                      commit_message=commit_message or "Upload prefixcap model")
    return repo_id
