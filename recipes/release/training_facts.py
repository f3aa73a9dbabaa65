"""The model card's Training section, from what the training recipes left around a model folder: TRL's
``training_args.bin`` of an SFT output, or ``pretrain_config.yaml`` and ``metrics.jsonl`` of a pretraining run."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

import yaml

from recipes.json_lines import read_json_lines
from recipes.training.run_logs import FINAL_MODEL, METRICS_FILE, RESOLVED_CONFIG, SFT_TRAINING_LOG

# What Trainer.save_model leaves in an SFT model folder, read for the card's Training section (the recipe's
# training log and the pretraining run folder's names come from recipes.training.run_logs).
SFT_ARGS = "training_args.bin"


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


def training_section(folder: Path, config: dict, notes: str | None = None,
                     conversion: list[str] | None = None, earlier: str | None = None) -> str:
    """The model card's Training section body: facts from what the training recipes left around ``folder``, else
    the ``earlier`` section as it is (that of the released card a downloaded release holds), else ``conversion``
    (the facts of a converted folder's card), else unknown; the config's image tokens, then the user's ``notes``
    (not added again to an earlier section that holds them)."""
    facts = _sft_facts(folder) or _pretrain_facts(folder)
    if facts is None and earlier and earlier.strip():  # e.g. a quantized download: no training files, same facts
        text = earlier.strip()
        return text + ("\n\n" + notes.strip() if notes and notes.strip() and notes.strip() not in text else "")
    facts = facts or (list(conversion) if conversion else None) or [
        f"- recipe: unknown (no `{SFT_ARGS}` of an SFT run in the folder and no `{RESOLVED_CONFIG}` of a "
        "pretraining run beside it)"]
    facts.append(f"- image tokens: {_shown(config.get('num_image_tokens'))} per image (`num_image_tokens`)")
    text = "\n".join(facts)
    return text + ("\n\n" + notes.strip() if notes and notes.strip() else "")
