"""Upload of a staging folder with huggingface_hub, deleting the repository files of the kinds this tool writes
that the staging folder no longer holds."""

from __future__ import annotations

from pathlib import Path

from dataset_builders.accounting import PACKING_STATS_FILE
from dataset_builders.cards import config_split_patterns

from .dataset_repo import card_configs
from .errors import ReleaseError
from .model_repo import MODEL_OPTIONAL_PATTERNS, MODEL_REQUIRED
from .staging import STAGING_MARKER


def managed_patterns(staging: Path, repo_type: str) -> list[str]:
    """Repository paths (fnmatch patterns, as upload_folder's ``delete_patterns``) of the file kinds this tool
    writes: a release deletes those the staging folder no longer has, so the repo never mixes two releases."""
    if repo_type == "model":
        return list(MODEL_REQUIRED + MODEL_OPTIONAL_PATTERNS) + ["README.md"]
    managed = {"README.md"}
    for config in card_configs(staging / "README.md"):
        for _, pattern in config_split_patterns(config):
            parent, _, name = pattern.rpartition("/")
            prefix = f"{parent}/" if parent else ""
            # the whole .datatrove folder: an earlier release may hold its timing logs, this one only accounting.json
            managed |= {pattern, f"{prefix}{PACKING_STATS_FILE}", f"{prefix}.datatrove/*"}
            if name.endswith(".tar"):
                managed.add(pattern[: -len(".tar")] + ".parquet")
    return sorted(managed)


def upload(staging: Path, repo_id: str, repo_type: str, private: bool) -> str:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise ReleaseError("HF_HUB_OFFLINE is set: unset it to upload, or use --dry-run to only build the folder")
    if not get_token():
        raise ReleaseError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN, or use --dry-run")
    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    # delete_patterns: repo files of these kinds not uploaded in this commit (an earlier release's single weights
    # file next to new shards, shards gone from the corpus) are deleted, so the repo mirrors the staging folder.
    info = api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type=repo_type,
                             commit_message="Release with the Open-Qwen2VL kit",
                             delete_patterns=managed_patterns(staging, repo_type), ignore_patterns=[STAGING_MARKER])
    return str(info.commit_url)
