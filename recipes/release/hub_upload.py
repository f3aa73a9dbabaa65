"""Upload of a staging folder with huggingface_hub, deleting the repository files of the kinds this tool writes
that the staging folder no longer holds."""

from __future__ import annotations

from pathlib import Path

from dataset_builders.accounting import PACKING_STATS_FILE
from dataset_builders.cards import config_split_patterns

from .dataset_repo import card_configs
from .errors import ReleaseError
from .listing import staged_files
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


# The hub refuses a file above 50 GB (https://huggingface.co/docs/hub/storage-limits); found at staging time, not
# after hours of uploading.
HUB_MAX_FILE_BYTES = 50 * 10**9


def check_file_sizes(staging: Path) -> None:
    """Refuse a staged file the hub would refuse for its size (split weights with ``max_shard_size``, data into more
    shards)."""
    too_large = [f"{name} ({size / 1e9:.1f} GB)" for name, size in staged_files(staging).items()
                 if size > HUB_MAX_FILE_BYTES]
    if too_large:
        raise ReleaseError(f"the hub refuses files over {HUB_MAX_FILE_BYTES / 1e9:.0f} GB: {', '.join(too_large)}; "
                           "save the weights in shards (save_pretrained's max_shard_size) or the data in more shards")


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id the hub would refuse (huggingface_hub's own rule) or one without its namespace: the card's
    usage snippet names the repository by this id, so ``name`` alone would point users at nothing."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ReleaseError(f"--repo-id {repo_id!r} is not a valid repository id: {err}") from err
    if "/" not in repo_id:
        raise ReleaseError(f"--repo-id {repo_id!r} has no namespace: give it as <user or org>/{repo_id}")


def check_can_upload() -> None:
    """Refuse before any slow work when an upload cannot happen: HF_HUB_OFFLINE set, or no token."""
    from huggingface_hub import get_token
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise ReleaseError("HF_HUB_OFFLINE is set: unset it to upload, or use --dry-run to only build the folder")
    if not get_token():
        raise ReleaseError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN, or use --dry-run")


def _check_visibility(api, repo_id: str, repo_type: str, private: bool) -> None:
    """create_repo(exist_ok=True) leaves an existing repository's visibility as it is: a --private release into a
    public repository would publish what the user meant to keep private."""
    if private and not api.repo_info(repo_id, repo_type=repo_type).private:
        raise ReleaseError(f"{repo_id} exists and is public, but --private was given: nothing was uploaded; make the "
                           "repository private on the hub (or with HfApi.update_repo_settings) first, or release "
                           "without --private")


def upload(staging: Path, repo_id: str, repo_type: str, private: bool, revision: str | None = None) -> str:
    """Upload ``staging`` as one commit to ``revision`` (a branch, created from main when missing; default main);
    returns the commit URL. Nothing is visible on the hub until the commit lands, so an interrupted upload is simply
    run again (files already uploaded are not sent twice)."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    check_can_upload()
    check_file_sizes(staging)
    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    _check_visibility(api, repo_id, repo_type, private)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    # delete_patterns: repo files of these kinds not uploaded in this commit (an earlier release's single weights
    # file next to new shards, shards gone from the corpus) are deleted, so the repo mirrors the staging folder.
    info = api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type=repo_type, revision=revision,
                             commit_message="Release with the Open-Qwen2VL kit",
                             delete_patterns=managed_patterns(staging, repo_type), ignore_patterns=[STAGING_MARKER])
    return str(info.commit_url)
