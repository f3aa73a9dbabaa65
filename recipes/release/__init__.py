"""Build (and upload) Hugging Face repositories for a kit model or a kit corpus.

    python -m recipes.release model <folder> --repo-id <org/name> [--eval-table table.md] [--dry-run]
    python -m recipes.release dataset <folder> --repo-id <org/name> [--dry-run]

The command line and its full description (what is staged, what is checked, what is uploaded) are in ``cli``;
each other module holds one part of a release:

- ``staging``: the staging folder (made empty only where that is safe), copying into it, the local-path check
- ``training_facts``: the model card's Training section from what the training recipes left
- ``model_repo``: model folder checks, the model card, assembly and the load check in a fresh process
- ``card_edits``: a README.md the user wrote (or an earlier released card) kept in the model card, the repo id and
  ``--revision`` in the cards' loading snippets
- ``dataset_repo``: the dataset card's configs and example counts checked against the files, assembly
- ``listing``: the staged files and the folder's files left out, printed before any upload
- ``hub_upload``: the cheap checks run first (repo id, token, offline) and the upload with huggingface_hub,
  deleting the files an earlier release left
- ``errors``: ``ReleaseError``, raised for a folder that cannot be released as it is
"""

from .cli import main
from .dataset_repo import DATASET_STATS_FILES, build_dataset_repo, check_dataset_counts
from .errors import ReleaseError
from .hub_upload import (
    HUB_MAX_FILE_BYTES,
    check_can_upload,
    check_file_sizes,
    check_repo_id,
    managed_patterns,
    upload,
)
from .listing import left_out, release_listing
from .model_repo import (
    CONVERTER_CARD_TAG,
    LOAD_CHECK,
    MODEL_OPTIONAL_PATTERNS,
    MODEL_REQUIRED,
    PICKLE_WEIGHTS,
    REMOTE_CODE_FILES,
    build_model_repo,
    converter_card,
    model_card,
)
from .staging import STAGING_MARKER, TEXT_SUFFIXES, VOCABULARY_FILES, check_no_local_paths, prepare_staging
from .training_facts import SFT_ARGS, training_section

__all__ = [
    "CONVERTER_CARD_TAG",
    "DATASET_STATS_FILES",
    "HUB_MAX_FILE_BYTES",
    "LOAD_CHECK",
    "MODEL_OPTIONAL_PATTERNS",
    "MODEL_REQUIRED",
    "PICKLE_WEIGHTS",
    "REMOTE_CODE_FILES",
    "SFT_ARGS",
    "STAGING_MARKER",
    "TEXT_SUFFIXES",
    "VOCABULARY_FILES",
    "ReleaseError",
    "build_dataset_repo",
    "build_model_repo",
    "check_can_upload",
    "check_dataset_counts",
    "check_file_sizes",
    "check_no_local_paths",
    "check_repo_id",
    "converter_card",
    "left_out",
    "main",
    "managed_patterns",
    "model_card",
    "prepare_staging",
    "release_listing",
    "training_section",
    "upload",
]
