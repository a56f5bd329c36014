"""Push a saved checkpoint folder (model, tokenizer, card, reports) to the Hub."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token
from transformers.utils import logging


logger = logging.get_logger(__name__)


class MissingTokenError(ValueError):
    """No Hub credentials: raised before anything is uploaded."""


def check_credentials(token: str | None = None) -> str:
    """The token to upload with; raises `MissingTokenError` (before any upload) when there is none."""
    token = token or get_token()
    if not token:
        raise MissingTokenError(
            "No Hugging Face token found: run `hf auth login` or set HF_TOKEN. Nothing was uploaded."
        )
    return token


def push_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload every file of `folder` to `repo_id` (created if missing, `private` if asked) on branch `revision`.

    Returns the commit URL. The token is never logged or written to the folder.
    """
    folder = Path(folder)
    if not (folder / "config.json").exists() and not (folder / "agentos_export.json").exists():
        raise FileNotFoundError(f"{folder} holds no config.json (nor an export's agentos_export.json): save a "
                                "checkpoint or an export there before pushing it.")
    token = check_credentials(token)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    logger.info(f"Uploading {folder.name} to {repo_id}" + (f"@{revision}" if revision else ""))
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, revision=revision,
        commit_message=commit_message or "Upload agentos checkpoint",
    )
    return str(getattr(commit, "commit_url", commit))
