"""Upload a model artifact folder to the Hugging Face Hub with the standard client (huggingface_hub.HfApi)."""

from __future__ import annotations

from pathlib import Path

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
