"""Build (and upload) Hugging Face repositories for a kit model or a kit corpus.

    python -m recipes.release model <folder> --repo-id <org/name> [--eval-table table.md] [--dry-run]
    python -m recipes.release dataset <folder> --repo-id <org/name> [--dry-run]

The repository content is first assembled and checked in a staging folder (``--staging``, default
``<folder>-release``; never the released folder or a folder around or inside it, and an existing one is only emptied
when this tool made it): for a model, the safetensors weights, ``config.json`` with its ``auto_map``, the remote-code
``.py`` files, the processor and tokenizer files, the generation config and a model card (with a Training section
generated from what the training recipes left: TRL's ``training_args.bin`` of an SFT output, ``pretrain_config.yaml``
and ``metrics.jsonl`` around a pretraining ``final_model``; ``--training-notes`` is appended to it); for a dataset,
the shards with their per-shard metadata parquets, the dataset card with its ``configs:`` block and the statistics
files the data stages write (``accounting.json``, ``packing_stats.json``). The checks: a model loads with
``AutoModelForImageTextToText`` in a fresh process with every weight matching ``config.json``; a dataset card's
recorded example counts match its files; no staged text file holds an absolute path of this machine (the eval table's
model path becomes the repo id). Without ``--dry-run`` the staging folder is uploaded with huggingface_hub's
``upload_folder`` (needs a token and a network); repository files of the kinds the tool writes that the staging folder
does not hold (an earlier release's weights or shards) are deleted in the same commit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from enum import Enum
from pathlib import Path

import yaml

from dataset_builders.accounting import ACCOUNTING_FILE, PACKING_STATS_FILE
from dataset_builders.cards import config_split_patterns
from recipes.json_lines import read_json_lines
from recipes.training.run_logs import FINAL_MODEL, METRICS_FILE, RESOLVED_CONFIG, SFT_TRAINING_LOG

# The only kit code a model folder carries (what save_pretrained copies); the converter's modules, factory.py and
# tokenizer_utils.py are kit-only and never staged.
REMOTE_CODE_FILES = ("configuration_open_qwen2vl.py", "modeling_open_qwen2vl.py", "processing_open_qwen2vl.py")
MODEL_REQUIRED = ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
                  "tokenizer_config.json") + REMOTE_CODE_FILES
MODEL_OPTIONAL_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "chat_template.jinja",
                           "additional_chat_templates/*.jinja", "special_tokens_map.json", SFT_TRAINING_LOG,
                           "*.md")
# Pickled weights the kit does not release. Other .bin files are fine: TRL's training_args.bin (pickled arguments,
# not weights) is in every SFT folder, and only the allow-list above is copied anyway.
PICKLE_WEIGHTS = ("pytorch_model*.bin", "adapter_model*.bin", "*.pt", "*.pth", "*.ckpt")
# Statistics beside a released data folder, by the names the data stages write them: each stage's read = kept +
# dropped (dataset_builders/pipelines.py: <output>/.datatrove/<stage>/accounting.json) and the pack stage's
# <config>/packing_stats.json. Datatrove's own stats.json files there are timings and logs, not released.
DATASET_STATS_FILES = (f".datatrove/*/{ACCOUNTING_FILE}", PACKING_STATS_FILE)
# What Trainer.save_model leaves in an SFT model folder, read for the card's Training section (the recipe's
# training log and the pretraining run folder's names come from recipes.training.run_logs).
SFT_ARGS = "training_args.bin"
# Written into every staging folder this tool makes: only such a folder is ever deleted (never uploaded).
STAGING_MARKER = ".open-qwen2vl-release-staging"
# Staged text files scanned for local absolute paths; vocabulary files hold token strings, not paths.
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".yaml", ".yml", ".txt")
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
# Loads the staged folder as a user would (fresh process, remote code, offline); missing, unexpected or mismatched
# weights only warn (or point to a report above the error), so they are collected and named on the last line.
LOAD_CHECK = """
import sys
from transformers import AutoModelForImageTextToText
_, info = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True, output_loading_info=True,
                                                      ignore_mismatched_sizes=True)
bad = [f"{key} ({len(value)}, e.g. {sorted(map(str, value))[0]})" for key, value in info.items() if value]
if bad:
    raise SystemExit("the weights do not match config.json: " + "; ".join(bad))
"""


class ReleaseError(ValueError):
    """The folder cannot be released as it is; the message says what is missing or wrong."""


def prepare_staging(folder: Path, staging: Path) -> None:
    """Make ``staging`` an empty folder marked as this tool's. Refuses a staging folder that is, contains or lies
    inside ``folder`` (emptying it would delete what is being released), and deletes an existing folder only when it
    holds the marker this tool writes: anything else may be someone's data."""
    folder, staging = folder.resolve(), staging.resolve()
    if staging == folder or staging in folder.parents or folder in staging.parents:
        raise ReleaseError(f"staging folder {staging} is, contains or lies inside the released folder {folder}; "
                           "pick a separate --staging")
    if (staging / STAGING_MARKER).is_file():
        shutil.rmtree(staging)
    elif staging.exists() and (not staging.is_dir() or any(staging.iterdir())):
        raise ReleaseError(f"staging folder {staging} exists, is not empty and was not made by this tool; "
                           "remove it or pick another --staging")
    staging.mkdir(parents=True, exist_ok=True)
    (staging / STAGING_MARKER).write_text("made by python -m recipes.release; emptied by the next release\n")


def _local_paths(folder: Path) -> list[str]:
    """Absolute paths of this machine that must not appear in a pushed file: the released folder and its parents
    down to the home folder (never a bare top-level folder such as /tmp), the working folder and the home folder."""
    home = Path.home().resolve()
    paths = {folder.resolve(), Path.cwd().resolve()}
    for parent in folder.resolve().parents:
        if parent == home:
            break
        paths.add(parent)
    paths = {p for p in paths if len(p.parts) > 2}
    if len(home.parts) > 1:
        paths.add(home)
    return sorted(map(str, paths), key=len, reverse=True)


def check_no_local_paths(staging: Path, folder: Path) -> None:
    """Refuse when a staged text file holds an absolute path of this machine (the released folder, its parents,
    the working or home folder): it would be published with the repository."""
    patterns = [(p, re.compile(r"(?<![\w.-])" + re.escape(p) + r"(?![\w.-])")) for p in _local_paths(folder)]
    for path in sorted(staging.rglob("*")):
        if not path.is_file() or path.suffix not in TEXT_SUFFIXES or path.name in VOCABULARY_FILES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for local, pattern in patterns:
            if pattern.search(text):
                raise ReleaseError(f"{path.relative_to(staging)} contains the local path {local}: it would be "
                                   "published; remove it from the file before releasing")


def _check_model_loads(staging: Path) -> None:
    """Load the staged folder in a fresh process (a corrupt weights file or a config.json that does not match the
    weights only shows there); refuse with the error's last line."""
    result = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(staging)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()] or ["(no error output)"]
        raise ReleaseError(f"the staged model in {staging} does not load with AutoModelForImageTextToText: "
                           f"{lines[-1].strip()}")


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
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)})
    if pickles:
        raise ReleaseError(f"{folder} holds pickle weights ({', '.join(pickles)}); the kit releases safetensors only")
    return config


def _field(source, name: str):
    """A value of a pickled TrainingArguments (an attribute) or of a plain mapping; None when absent."""
    return source.get(name) if isinstance(source, dict) else getattr(source, name, None)


def _shown(value) -> str:
    if value is None:
        return "unknown"
    value = value.value if isinstance(value, Enum) else value  # TrainingArguments' SchedulerType
    return f"{value:g}" if isinstance(value, float) else str(value)


def _last_step(log: Path) -> int | None:
    """The last optimizer step a run logged (its JSON-lines log), None without a log."""
    if not log.is_file():
        return None
    steps = [record["step"] for _, record in read_json_lines(log) if isinstance(record.get("step"), int)]
    return max(steps, default=None)


def _hyperparameters(args, steps_done: int | None) -> list[str]:
    """Length, learning rate, batch and seed as both recipes name them (TrainingArguments / PretrainArguments)."""
    max_steps, epochs = _field(args, "max_steps"), _field(args, "num_train_epochs")
    if isinstance(max_steps, int) and max_steps > 0:  # max_steps > 0 overrides the epochs in both recipes
        length = f"{max_steps} optimizer steps"
    else:
        length = f"{_shown(epochs)} epochs"
    if steps_done is not None:
        length += f" ({steps_done} steps logged)"
    return [
        f"- length: {length}",
        f"- learning rate: {_shown(_field(args, 'learning_rate'))} "
        f"({_shown(_field(args, 'lr_scheduler_type'))} schedule)",
        f"- batch: {_shown(_field(args, 'per_device_train_batch_size'))} per device x "
        f"{_shown(_field(args, 'gradient_accumulation_steps'))} gradient accumulation steps",
        f"- seed: {_shown(_field(args, 'seed'))}",
    ]


def _sft_facts(folder: Path) -> list[str] | None:
    """From the SFT output's ``training_args.bin`` (a LoRA run keeps it with the adapter); None when there is none."""
    found = [path for path in (folder / SFT_ARGS, folder / "adapter" / SFT_ARGS) if path.is_file()]
    if not found:
        return None
    recipe = "supervised fine-tuning with TRL's `SFTTrainer` (`recipes/sft.py`)"
    lines = [f"- recipe: {recipe}" + (", LoRA adapter merged into the weights" if found[0].parent != folder else "")]
    try:
        import torch

        # Trainer pickles its SFTConfig (arguments, not weights); unpickling needs trl and may fail on another version.
        args = torch.load(found[0], weights_only=False)
    except Exception as err:  # noqa: BLE001 - an unreadable file leaves the facts unknown, not the release
        return lines + [f"- hyperparameters: unknown (`{SFT_ARGS}` could not be read: {type(err).__name__})"]
    return lines + _hyperparameters(args, _last_step(folder / SFT_TRAINING_LOG))


def _published_source(source: str) -> str:
    """A hub id or remote URL as it is; a local folder by its last component only (the card is public)."""
    remote = re.match(r"^[a-z][\w+.-]*://", source) and not source.startswith("file://")
    hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) and not Path(source).exists()
    return f"`{source}`" if remote or hub_id else f"a local folder named `{Path(source.rstrip('/')).name}`"


def _read_yaml(path: Path) -> tuple[dict | None, str]:
    """(mapping, "") or (None, why it could not be read)."""
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        return None, type(err).__name__
    return (content, "") if isinstance(content, dict) else (None, "not a mapping")


def _pretrain_facts(folder: Path) -> list[str] | None:
    """From ``pretrain_config.yaml`` in the folder or, for a ``final_model``, in the run folder around it."""
    run_dirs = [folder] + ([folder.parent] if folder.name == FINAL_MODEL else [])
    run_dir = next((d for d in run_dirs if (d / RESOLVED_CONFIG).is_file()), None)
    if run_dir is None:
        return None
    args, why = _read_yaml(run_dir / RESOLVED_CONFIG)
    if args is None:
        return ["- recipe: pretraining (`recipes/pretrain.py`)",
                f"- hyperparameters: unknown (`{RESOLVED_CONFIG}` could not be read: {why})"]
    dataset = args.get("dataset_name_or_path")
    data = _published_source(str(dataset)) if dataset else "unknown"
    if dataset and args.get("dataset_config_name"):
        data += f", config `{args['dataset_config_name']}`"
    return [f"- recipe: pretraining (`recipes/pretrain.py`), stage `{_shown(args.get('stage'))}`",
            f"- data: {data}"] + _hyperparameters(args, _last_step(run_dir / METRICS_FILE))


def training_section(folder: Path, config: dict, notes: str | None = None) -> str:
    """The model card's Training section body: facts from what the training recipes left around ``folder`` (unknown
    when they left nothing), the config's image tokens, then the user's ``notes``."""
    facts = _sft_facts(folder) or _pretrain_facts(folder) or [
        f"- recipe: unknown (no `{SFT_ARGS}` of an SFT run in the folder and no `{RESOLVED_CONFIG}` of a "
        "pretraining run beside it)"]
    facts.append(f"- image tokens: {_shown(config.get('num_image_tokens'))} per image (`num_image_tokens`)")
    text = "\n".join(facts)
    return text + ("\n\n" + notes.strip() if notes and notes.strip() else "")


def model_card(config: dict, repo_id: str, eval_table: str | None, training: str | None) -> str:
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
    if training:
        lines += ["## Training", "", training.strip(), ""]
    return "\n".join(lines)


def build_model_repo(folder: Path, staging: Path, repo_id: str, eval_table: Path | None = None,
                     training_notes: Path | None = None) -> Path:
    """Assemble a model repository in ``staging`` from a kit model folder, check that it holds no local path and
    loads; returns ``staging``."""
    config = _check_model_folder(folder)
    prepare_staging(folder, staging)
    _copy_matching(folder, staging, MODEL_REQUIRED + MODEL_OPTIONAL_PATTERNS)
    card = model_card(
        config, repo_id,
        _eval_table_text(eval_table.read_text(), folder, repo_id) if eval_table else None,
        training_section(folder, config, training_notes.read_text() if training_notes else None),
    )
    (staging / "README.md").write_text(card, encoding="utf-8")
    check_no_local_paths(staging, folder)
    _check_model_loads(staging)
    return staging


def _eval_table_text(table: str, folder: Path, repo_id: str) -> str:
    """recipes/eval.py's table names the model by the path it was evaluated from; the card names it by repo id."""
    table = re.sub(r"^(Evaluation of `)[^`]*(`)", lambda m: m.group(1) + repo_id + m.group(2), table)
    return table.replace(str(folder.resolve()), repo_id)


def _card_meta(card_path: Path) -> dict:
    text = card_path.read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---", text, re.S)
    if not match:
        raise ReleaseError(f"{card_path} has no YAML front matter; a dataset card needs a `configs:` block")
    meta = yaml.safe_load(match.group(1)) or {}
    if not meta.get("configs"):
        raise ReleaseError(f"{card_path} front matter has no `configs:`; load_dataset(repo, name) needs it")
    return meta


def _card_configs(card_path: Path) -> list[dict]:
    return _card_meta(card_path)["configs"]


def _recorded_counts(meta: dict) -> dict[tuple[str, str], int]:
    """(config, split) -> num_examples recorded in the card's ``dataset_info``."""
    infos = meta.get("dataset_info") or []
    counts = {}
    for info in [infos] if isinstance(infos, dict) else infos:
        for split in info.get("splits") or []:
            if split.get("num_examples") is not None:
                counts[(info.get("config_name", "default"), split["name"])] = int(split["num_examples"])
    return counts


def _cheap_count(folder: Path, patterns: list[str]) -> int | None:
    """Examples in the files of ``patterns`` without reading them: parquet footers, and for webdataset shards the
    metadata parquets as the card writer counts them (dataset_builders.cards._count); None when unknown."""
    import pyarrow.parquet as pq
    from datatrove.io import get_datafolder

    from dataset_builders.cards import _count
    from dataset_builders.shards import SHARD_GLOB

    total = 0
    for pattern in patterns:
        parent, _, name = pattern.rpartition("/")
        if name == SHARD_GLOB and parent:
            samples = _count(get_datafolder(str(folder)), parent)[1]
        elif pattern.endswith(".parquet"):
            samples = sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(folder.glob(pattern)) if p.is_file())
        else:
            samples = None
        if samples is None:
            return None
        total += samples
    return total


def check_dataset_counts(folder: Path, staging: Path) -> None:
    """Refuse when the card's ``dataset_info`` records a number of examples the files do not hold: datasets would
    raise NonMatchingSplitsSizesError on every load of the released repository."""
    meta = _card_meta(staging / "README.md")
    recorded = _recorded_counts(meta)
    for config in meta["configs"]:
        name = config.get("config_name", "default")
        by_split: dict[str, list[str]] = {}
        for split, pattern in config_split_patterns(config):
            by_split.setdefault(split, []).append(pattern)
        for split, patterns in by_split.items():
            if (name, split) not in recorded:
                continue
            expected, found = recorded[(name, split)], _cheap_count(folder, patterns)
            if found is None:  # not countable from metadata: let datasets build the split and verify it
                from datasets import load_dataset

                with tempfile.TemporaryDirectory() as cache:
                    try:
                        found = len(load_dataset(str(staging), name, split=split, cache_dir=cache))
                    except Exception as err:  # noqa: BLE001 - any failure means the release would not load
                        last = (str(err).strip().splitlines() or [""])[-1]
                        raise ReleaseError(f"config {name!r} split {split!r} does not load: "
                                           f"{type(err).__name__}: {last}") from err
            if found != expected:
                raise ReleaseError(f"config {name!r} split {split!r}: the card records {expected} examples but the "
                                   f"files hold {found}; regenerate the card or restore the missing files")


def _shard_metadata(files: set[Path]) -> set[Path]:
    """The img2dataset metadata parquet beside each shard (``00000.tar`` -> ``00000.parquet``): the card promises
    it, and it holds each shard's sample count and per-sample metadata."""
    return {path.with_suffix(".parquet") for path in files
            if path.suffix == ".tar" and path.with_suffix(".parquet").is_file()}


def _statistics(files: set[Path]) -> set[Path]:
    """The data stages' statistics (``DATASET_STATS_FILES``) of the folders that hold released data files."""
    return {path for parent in {p.parent for p in files} for pattern in DATASET_STATS_FILES
            for path in parent.glob(pattern) if path.is_file()}


def build_dataset_repo(folder: Path, staging: Path) -> Path:
    """Assemble a dataset repository (shards with their metadata parquets, card, statistics) in ``staging``; every
    config must match files, the card's example counts must match them and no staged file may hold a local path."""
    card = folder / "README.md"
    if not card.is_file():
        raise ReleaseError(f"{folder} has no README.md dataset card")
    configs = _card_configs(card)
    files: set[Path] = set()
    for config in configs:
        for _, pattern in config_split_patterns(config):
            matched = [p for p in folder.glob(pattern) if p.is_file()]
            if not matched:
                raise ReleaseError(
                    f"config {config.get('config_name')!r}: pattern {pattern!r} matches no file in {folder}")
            files.update(matched)
    files |= _shard_metadata(files) | _statistics(files)
    prepare_staging(folder, staging)
    for path in sorted(files | {card}):
        target = staging / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    check_no_local_paths(staging, folder)
    check_dataset_counts(folder, staging)
    return staging


def managed_patterns(staging: Path, repo_type: str) -> list[str]:
    """Repository paths (fnmatch patterns, as upload_folder's ``delete_patterns``) of the file kinds this tool
    writes: a release deletes those the staging folder no longer has, so the repo never mixes two releases."""
    if repo_type == "model":
        return list(MODEL_REQUIRED + MODEL_OPTIONAL_PATTERNS) + ["README.md"]
    managed = {"README.md"}
    for config in _card_configs(staging / "README.md"):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.release", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["model", "dataset"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--staging", type=Path, help="where to assemble the repository (default <folder>-release)")
    parser.add_argument("--eval-table", type=Path, help="Markdown table for the model card (from recipes/eval.py)")
    parser.add_argument("--training-notes", type=Path,
                        help="Markdown appended to the model card's generated Training section")
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
