"""Build (and upload) Hugging Face repositories for a kit model or a kit corpus.

    python -m recipes.release model <folder> --repo-id <org/name> [--eval-table table.md] [--dry-run]
    python -m recipes.release dataset <folder> --repo-id <org/name> [--dry-run]

The repository content is first assembled and checked in a staging folder (``--staging``, default
``<folder>-release``): for a model, the safetensors weights, ``config.json`` with its ``auto_map``, the remote-code
``.py`` files, the processor and tokenizer files, the generation config and a model card; for a dataset, the shards,
the dataset card with its ``configs:`` block and the statistics files. Without ``--dry-run`` the staging folder is
uploaded with huggingface_hub's ``upload_folder`` (needs a token and a network).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import yaml

REMOTE_CODE_FILES = ("configuration_open_qwen2vl.py", "modeling_open_qwen2vl.py", "processing_open_qwen2vl.py")
MODEL_REQUIRED = ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
                  "tokenizer_config.json") + REMOTE_CODE_FILES
MODEL_OPTIONAL_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "chat_template.jinja",
                           "additional_chat_templates/*.jinja", "special_tokens_map.json", "training_log.jsonl",
                           "*.md")


class ReleaseError(ValueError):
    """The folder cannot be released as it is; the message says what is missing or wrong."""


def _copy_matching(source: Path, staging: Path, patterns: tuple[str, ...]) -> list[str]:
    copied = []
    for pattern in patterns:
        for path in sorted(source.glob(pattern)):
            if path.is_file() and path.name != "README.md":
                target = staging / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                copied.append(str(path.relative_to(source)))
    return copied


def _check_model_folder(folder: Path) -> dict:
    missing = [name for name in MODEL_REQUIRED if not (folder / name).is_file()]
    if not list(folder.glob("*.safetensors")):
        missing.append("*.safetensors (weights)")
    if missing:
        raise ReleaseError(f"{folder} is not a complete Open-Qwen2VL folder; missing: {', '.join(missing)}")
    config = json.loads((folder / "config.json").read_text())
    auto_map = config.get("auto_map", {})
    for key in ("AutoConfig", "AutoModelForImageTextToText"):
        if key not in auto_map:
            raise ReleaseError(f"{folder}/config.json has no auto_map[{key!r}]: it would not load with trust_remote_code")
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise ReleaseError(f"{folder} holds pickle weights (.bin/.pt); the kit releases safetensors only")
    return config


def model_card(config: dict, repo_id: str, eval_table: str | None, training_notes: str | None) -> str:
    text, vision = config["text_config"], config["vision_config"]
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "license": "apache-2.0",
        "tags": ["open-qwen2vl", "vision-language", "multimodal", "custom_code"],
    }
    name = repo_id.split("/")[-1]
    lines = [
        "---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        "An [Open-Qwen2VL](https://arxiv.org/abs/2504.00595) model packaged by the Open-Qwen2VL kit: a SigLIP vision "
        "encoder, an adaptive average-pool projector and a Qwen2 language model, loadable with the standard "
        "transformers Auto classes (the modeling code ships in this repository).", "",
        "## Use", "", "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)',
        f'processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)',
        'inputs = processor(text="<s><image>\\nDescribe the image.", images=[image], return_tensors="pt")',
        "print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))",
        "```", "",
        "## Architecture", "",
        "| part | value |", "|---|---|",
        f"| vision | SigLIP, {vision.get('num_hidden_layers')} layers, width {vision.get('hidden_size')}, "
        f"{vision.get('image_size')}px, patch {vision.get('patch_size')}, features of layer "
        f"{config.get('vision_feature_layer')} |",
        f"| image tokens | {config.get('num_image_tokens')} per image (adaptive average pooling) |",
        f"| language model | Qwen2, {text.get('num_hidden_layers')} layers, width {text.get('hidden_size')}, "
        f"vocabulary {text.get('vocab_size')} |",
        "",
    ]
    if eval_table:
        lines += ["## Evaluation", "", eval_table.strip(), ""]
    if training_notes:
        lines += ["## Training", "", training_notes.strip(), ""]
    return "\n".join(lines)


def build_model_repo(folder: Path, staging: Path, repo_id: str, eval_table: Path | None = None,
                     training_notes: Path | None = None) -> Path:
    """Assemble a model repository in ``staging`` from a kit model folder; returns ``staging``."""
    config = _check_model_folder(folder)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    _copy_matching(folder, staging, MODEL_REQUIRED + MODEL_OPTIONAL_PATTERNS)
    card = model_card(
        config, repo_id,
        eval_table.read_text() if eval_table else None,
        training_notes.read_text() if training_notes else None,
    )
    (staging / "README.md").write_text(card, encoding="utf-8")
    return staging


def _card_configs(card_path: Path) -> list[dict]:
    text = card_path.read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---", text, re.S)
    if not match:
        raise ReleaseError(f"{card_path} has no YAML front matter; a dataset card needs a `configs:` block")
    meta = yaml.safe_load(match.group(1)) or {}
    configs = meta.get("configs")
    if not configs:
        raise ReleaseError(f"{card_path} front matter has no `configs:`; load_dataset(repo, name) needs it")
    return configs


def build_dataset_repo(folder: Path, staging: Path) -> Path:
    """Assemble a dataset repository (shards, card, statistics) in ``staging``; every config must match files."""
    card = folder / "README.md"
    if not card.is_file():
        raise ReleaseError(f"{folder} has no README.md dataset card")
    configs = _card_configs(card)
    files: set[Path] = set()
    for config in configs:
        data_files = config.get("data_files", [])
        entries = data_files if isinstance(data_files, list) else [data_files]
        for entry in entries:
            patterns = entry.get("path") if isinstance(entry, dict) else entry
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                matched = [p for p in folder.glob(pattern) if p.is_file()]
                if not matched:
                    raise ReleaseError(
                        f"config {config.get('config_name')!r}: pattern {pattern!r} matches no file in {folder}")
                files.update(matched)
    files.update(p for p in folder.rglob("*") if p.is_file() and p.suffix in {".json", ".parquet", ".npy"}
                 and "stats" in p.name)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for path in sorted(files | {card}):
        target = staging / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return staging


def upload(staging: Path, repo_id: str, repo_type: str, private: bool) -> str:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise ReleaseError("HF_HUB_OFFLINE is set: unset it to upload, or use --dry-run to only build the folder")
    if not get_token():
        raise ReleaseError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN, or use --dry-run")
    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type=repo_type,
                             commit_message="Release with the Open-Qwen2VL kit")
    return str(info.commit_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.release", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["model", "dataset"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--staging", type=Path, help="where to assemble the repository (default <folder>-release)")
    parser.add_argument("--eval-table", type=Path, help="Markdown table for the model card (from recipes/eval.py)")
    parser.add_argument("--training-notes", type=Path, help="Markdown describing how the model was trained")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="only build the staging folder; upload nothing")
    args = parser.parse_args(argv)
    folder = args.folder.resolve()
    if not folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    staging = (args.staging or folder.with_name(folder.name + "-release")).resolve()
    try:
        if args.kind == "model":
            build_model_repo(folder, staging, args.repo_id, args.eval_table, args.training_notes)
        else:
            build_dataset_repo(folder, staging)
        print(f"built {args.kind} repository content for {args.repo_id} in {staging}")
        if not args.dry_run:
            print(f"uploaded: {upload(staging, args.repo_id, args.kind, args.private)}")
    except ReleaseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
