"""Configuration of the pretraining recipe: three dataclasses, a YAML file, command-line overrides.

Parsing reuses TRL's ``TrlParser`` (an ``HfArgumentParser`` that reads ``--config file.yaml``): the YAML sets the
defaults and any ``--field value`` on the command line overrides them, so every value is overridable. Keys are
flat, as in TRL and transformers (``learning_rate``, ``per_device_train_batch_size``, ...).

A key that does not exist, in the YAML or on the command line, is an error naming the key and the closest valid
names; values are checked in ``__post_init__`` (argparse does not check YAML-provided defaults against choices).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

STAGES = ("projector", "pretrain", "full")
ATTENTION_MODES = ("faithful", "isolated")
BAD_DOCUMENT_POLICIES = ("drop", "raise")
LOSS_REDUCTIONS = ("token", "micro_batch_mean")
MODEL_PRESETS = ("tiny", "open_qwen2vl_2b")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard", "trackio", "none")


def _none_from_text(arguments) -> None:
    """``--key None`` (or ``null``) on the command line sets an optional setting back to None, e.g. to undo a value
    the YAML file sets; argparse alone would keep the text "None"."""
    for item in dataclasses.fields(arguments):
        if item.default is None and getattr(arguments, item.name) in ("None", "null"):
            setattr(arguments, item.name, None)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


# Config attributes a preset passes through besides its own named arguments (num_image_tokens and
# vision_feature_layer have arguments of their own).
_PRESET_CONFIG_KEYS = ("image_token_id", "projector_hidden_act")


def _check_preset_kwargs(preset: str, kwargs: dict) -> None:
    """Unknown keys would become stray config attributes, silently ignored (a misspelt width, or a text-model field
    the 2B preset does not take): name them with the valid ones."""
    import inspect

    from modeling_open_qwen2vl import OpenQwen2VLConfig

    named = inspect.signature(getattr(OpenQwen2VLConfig, preset)).parameters
    valid = sorted({name for name, p in named.items() if p.kind is p.POSITIONAL_OR_KEYWORD} - {"num_image_tokens"}
                   | set(_PRESET_CONFIG_KEYS))
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"model_preset_kwargs: {unknown} not accepted by the {preset!r} preset; valid keys: {valid}")


@dataclass
class ModelArguments:
    """Where the model comes from. Exactly one source: a kit checkpoint, two pretrained parts, or a preset."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An Open-Qwen2VL checkpoint (folder or hub id) to continue from, e.g. a finished pretrain "
                  "run's final_model for the `full` stage."},
    )
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "SigLIP checkpoint (SiglipModel or SiglipVisionModel), e.g. "
                  "google/siglip-so400m-patch14-384. Used with text_model_name_or_path; the projector starts fresh."},
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Qwen2 causal LM checkpoint, e.g. Qwen/Qwen2.5-1.5B-Instruct."},
    )
    model_preset: str | None = field(
        default=None,
        metadata={"help": f"Random init from a preset config, one of {list(MODEL_PRESETS)} (tests, benchmarks)."},
    )
    model_preset_kwargs: str | None = field(
        default=None,
        metadata={"help": "JSON object of keyword arguments for the preset, e.g. '{\"hidden_size\": 128}'. In YAML a "
                  "mapping is accepted too."},
    )
    num_image_tokens: int = field(default=144, metadata={"help": "Visual tokens per image (a perfect square)."})
    vision_feature_layer: int = field(default=-2, metadata={"help": "Vision hidden state fed to the projector."})
    vision_hidden_act: str | None = field(
        default=None,
        metadata={"help": "Activation of the SigLIP tower. Default: exact GELU ('gelu') when built from a SigLIP "
                  "checkpoint (the original runs timm's SigLIP with exact GELU; transformers' SigLIP configs say "
                  "'gelu_pytorch_tanh'), the source's own for a kit checkpoint or a preset; when set it applies to "
                  "any source (a config change: the activation has no weights)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Qwen2.5 tokenizer (folder, hub id or tokenizer.json); default: the offline official one."},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa, eager, flash_attention_2, flex_attention, ..."}
    )
    init_seed: int = field(default=1152, metadata={"help": "Seed for fresh weights (the original seeds the "
                                                           "projector with the vision width, 1152)."})

    def __post_init__(self):
        _none_from_text(self)
        if isinstance(self.model_preset_kwargs, dict):  # a YAML mapping
            self.model_preset_kwargs = json.dumps(self.model_preset_kwargs)
        sources = {
            "model_name_or_path": self.model_name_or_path is not None,
            "vision_model_name_or_path + text_model_name_or_path": self.vision_model_name_or_path is not None
            or self.text_model_name_or_path is not None,
            "model_preset": self.model_preset is not None,
        }
        chosen = [name for name, used in sources.items() if used]
        if len(chosen) != 1:
            raise ValueError(
                f"choose exactly one model source among {list(sources)}; got {chosen or 'none'}"
            )
        if sources["vision_model_name_or_path + text_model_name_or_path"] and not (
            self.vision_model_name_or_path and self.text_model_name_or_path
        ):
            raise ValueError("vision_model_name_or_path and text_model_name_or_path must be given together")
        if self.model_preset is not None:
            _check_choice("model_preset", self.model_preset, MODEL_PRESETS)
        if self.model_preset_kwargs is not None:
            try:
                parsed = json.loads(self.model_preset_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"model_preset_kwargs is not valid JSON: {error}") from None
            if not isinstance(parsed, dict):
                raise ValueError("model_preset_kwargs must be a JSON object")
            if self.model_preset is None:
                raise ValueError("model_preset_kwargs is set but the model does not come from a model_preset")
            _check_preset_kwargs(self.model_preset, parsed)
        from modeling_open_qwen2vl.configuration_open_qwen2vl import is_square_token_count

        if not is_square_token_count(self.num_image_tokens):
            raise ValueError(f"num_image_tokens={self.num_image_tokens} must be a positive perfect square")

    @property
    def preset_kwargs(self) -> dict:
        return json.loads(self.model_preset_kwargs) if self.model_preset_kwargs else {}


@dataclass
class DataArguments:
    """The packed corpus (rows with images, texts, lengths, uids) and how it is batched."""

    dataset_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Packed corpus: a local folder of shards with a dataset card, or a hub dataset id. "
                  "Read with datasets.load_dataset(dataset_name_or_path, dataset_config_name, split=...)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset config, e.g. packed_144."})
    dataset_split: str = field(default="train")
    streaming: bool = field(default=False, metadata={"help": "Read with streaming=True (requires max_steps)."})
    attention: Literal["faithful", "isolated"] = field(
        default="faithful",
        metadata={"help": "faithful: documents of a pack attend to each other, positions run on (the paper); "
                  "isolated: positions restart per document and attention is block-causal."},
    )
    max_length: int = field(default=4096, metadata={"help": "Pack capacity in LLM positions."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Packs per device per micro-batch."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Map-style datasets only."})
    shuffle: bool = field(default=True, metadata={"help": "Map-style: a seeded permutation of packs per epoch "
                                                          "(a stream is read in shard order: shuffle when packing)."})
    log_sample_uids: bool = field(
        default=False, metadata={"help": "Write the uids of every step's documents to samples.jsonl."}
    )
    on_bad_document: Literal["drop", "raise"] = field(
        default="drop",
        metadata={"help": "A document with no or an undecodable image, an empty caption, or longer than max_length: "
                  "drop (logged with its uid, counted in metrics.jsonl's documents_dropped) or raise (stop the run "
                  "with an error naming it)."},
    )

    def __post_init__(self):
        _none_from_text(self)
        if not self.dataset_name_or_path:
            raise ValueError("dataset_name_or_path is required (a packed corpus folder or hub dataset id)")
        _check_choice("attention", self.attention, ATTENTION_MODES)
        _check_choice("on_bad_document", self.on_bad_document, BAD_DOCUMENT_POLICIES)
        _check_positive("max_length", self.max_length)
        _check_positive("per_device_train_batch_size", self.per_device_train_batch_size)
        _check_positive("dataloader_num_workers", self.dataloader_num_workers, allow_zero=True)
        if self.streaming and self.dataloader_num_workers:
            raise ValueError(
                "dataloader_num_workers > 0 is not supported with streaming=True: the stream is read and collated "
                "in a background thread so that its position can be checkpointed exactly; set it to 0"
            )


@dataclass
class PretrainArguments:
    """Stage, optimisation, checkpoints and logging."""

    output_dir: str = field(default="runs/pretrain", metadata={"help": "Checkpoints, logs and final_model go here."})
    stage: Literal["projector", "pretrain", "full"] = field(
        default="pretrain",
        metadata={"help": "projector: only the projector trains; pretrain: projector + LLM (vision frozen); "
                  "full: everything trains."},
    )
    learning_rate: float = 5e-5
    weight_decay: float = field(default=0.01, metadata={"help": "Not applied to biases and norm weights."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    adam_fused: bool | None = field(
        default=None,
        metadata={"help": "torch's fused AdamW kernel (one kernel for all parameters); default: on when training on "
                  "CUDA or CPU, off elsewhere (the per-tensor loop).", "nargs": "?", "const": True},
    )
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={"help": "A transformers SchedulerType name stepped once per optimizer step (cosine, linear, "
                  "cosine_with_min_lr, warmup_stable_decay, ...); the metric-driven reduce_lr_on_plateau and greedy "
                  "are refused (pretraining computes no evaluation metric)."},
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra arguments of the schedule (transformers' scheduler_specific_kwargs), e.g. "
                  "'{\"min_lr_rate\": 0.1}' for cosine_with_min_lr or '{\"num_decay_steps\": 100}' for "
                  "warmup_stable_decay: a JSON object on the command line, a mapping in YAML."},
    )
    warmup_ratio: float = field(default=0.03, metadata={"help": "Warmup steps = int(ratio * total steps)."})
    warmup_steps: int = field(default=0, metadata={"help": "Overrides warmup_ratio when > 0."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "0 disables clipping (the norm is still logged)."})
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "Passes over the corpus; a fraction stops part-way (steps rounded up)."}
    )
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; > 0 overrides num_train_epochs."})
    gradient_accumulation_steps: int = 1
    loss_reduction: Literal["token", "micro_batch_mean"] = field(
        default="token",
        metadata={"help": "token: every supervised token of the optimizer step weighs the same (across micro-batches "
                  "and processes); micro_batch_mean: the original's mean of per-micro-batch means."},
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no, bf16 or fp16; default: what `accelerate launch` was configured with."}
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute decoder/encoder layers in backward (without FSDP; FSDP yamls set their own)."},
    )
    compile_layers: bool = field(
        default=False,
        metadata={"help": "torch.compile every SigLIP encoder layer and Qwen2 decoder layer in place (regional "
                  "compilation: fuses the norms, rotary embedding, activations and casts between the matmuls). "
                  "The first step pays the compilation; checkpoints are unchanged."},
    )
    cpu_fsdp: bool = field(
        default=False,
        metadata={"help": "Under torchrun on CPU (gloo): shard with torch FSDP2 using the kit's wrap plan. Accelerate "
                  "cannot run FSDP on CPU; this exists to test sharding without GPUs."},
    )
    seed: int = field(default=42, metadata={"help": "Data order and run RNG."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N optimizer steps (0: only at the end)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep the newest N checkpoints."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run, or resume from a checkpoint elsewhere, in an output_dir that holds "
                  "another run's checkpoints, deleting them (without it, that is refused: use --resume to continue "
                  "that run)."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the newest complete checkpoint in output_dir. A resume continues the same "
                  "run: changed optimizer, schedule, batch or data settings are refused, each named."},
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "Continue from this checkpoint (the same rules as --resume)."}
    )
    logging_steps: int = field(
        default=1,
        metadata={"help": "Log to trackers every N steps, the figures of those N steps (loss over all their "
                  "supervised tokens, tokens/s over their time: recipes/training/tracker_interval.py); "
                  "metrics.jsonl: every step."},
    )
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "tensorboard, trackio, none (several: space- or comma-separated).", "nargs": "+"},
    )
    run_name: str | None = field(default=None, metadata={"help": "Tracker project name (default: output dir name)."})
    peak_tflops: float | None = field(
        default=None, metadata={"help": "Peak dense TFLOP/s of one device for MFU (default: known GPUs)."}
    )
    save_final_model: bool = field(default=True, metadata={"help": "Write output_dir/final_model (HF folder)."})
    save_final_checkpoint: bool = field(
        default=True, metadata={"help": "Write a resumable checkpoint at the last step (off for benchmarks)."}
    )

    def __post_init__(self):
        _none_from_text(self)
        if isinstance(self.report_to, (list, tuple)):  # a YAML list, or several names on the command line
            self.report_to = ",".join(str(name) for name in self.report_to)
        _check_choice("stage", self.stage, STAGES)
        _check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        if self.mixed_precision is not None:
            _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        for tracker in self.trackers or ["none"]:
            _check_choice("report_to", tracker, TRACKERS)
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        _check_positive("num_train_epochs", self.num_train_epochs)
        _check_positive("logging_steps", self.logging_steps)
        _check_positive("save_steps", self.save_steps, allow_zero=True)
        _check_positive("max_grad_norm", self.max_grad_norm, allow_zero=True)
        _check_positive("warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        self.lr_scheduler_kwargs = _json_object("lr_scheduler_kwargs", self.lr_scheduler_kwargs)
        _check_scheduler(self)
        if self.save_total_limit is not None:
            _check_positive("save_total_limit", self.save_total_limit)

    @property
    def trackers(self) -> list[str]:
        names = [name.strip() for name in str(self.report_to).split(",") if name.strip()]
        return [name for name in names if name != "none"]


def _json_object(name: str, value) -> dict:
    """A mapping from YAML, a JSON object from the command line, or nothing (as TrainingArguments takes its dict
    fields)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object (a mapping), got {value!r}")
    return value


# Schedules transformers steps on an evaluation metric (scheduler.step(metric)): pretraining has none.
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")


def _check_scheduler(args: "PretrainArguments") -> None:
    """Refuse, at parse time, a schedule the run could not apply as asked: an unknown name, a metric-driven one,
    arguments it does not take (or lacks), a warmup it would ignore."""
    import torch
    from transformers import SchedulerType, get_scheduler

    name, kwargs = args.lr_scheduler_type, args.lr_scheduler_kwargs
    names = [item.value for item in SchedulerType if item.value not in METRIC_SCHEDULERS]
    if name in METRIC_SCHEDULERS:
        raise ValueError(f"lr_scheduler_type={name!r} steps on an evaluation metric, which pretraining does not "
                         f"compute; choose a schedule by step: {names}")
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=2)
        raise ValueError(f"lr_scheduler_type={name!r} is not one of {names}"
                         + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if name in ("constant", "constant_with_warmup") and kwargs:
        # transformers' get_scheduler drops them for these two
        raise ValueError(f"lr_scheduler_type={name!r} takes no lr_scheduler_kwargs, got {kwargs}")
    if name == "constant" and (args.warmup_ratio or args.warmup_steps):
        raise ValueError(f"lr_scheduler_type='constant' has no warmup, so warmup_ratio={args.warmup_ratio} / "
                         f"warmup_steps={args.warmup_steps} would be ignored: use constant_with_warmup, or set both "
                         "to 0")
    # A throwaway schedule names missing, unknown or bad keyword arguments now, not after the model is loaded.
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    try:
        schedule = get_scheduler(name, probe, num_warmup_steps=1, num_training_steps=10,
                                 scheduler_specific_kwargs=kwargs)
        _check_schedule_factors(schedule, steps=10)
    except (TypeError, ValueError, ArithmeticError) as error:
        raise ValueError(f"lr_scheduler_kwargs={kwargs} do not fit lr_scheduler_type={name!r}: {error}") from None


def _check_schedule_factors(schedule, steps: int) -> None:
    """Evaluate the schedule's factor at every step of a short run: building it evaluates only step 0, inside the
    warmup, so a bad value (e.g. ``"min_lr_rate": "0.1"``, a string) would otherwise fail the real run once its
    warmup ends, hours in."""
    for step in range(steps + 1):
        for factor in getattr(schedule, "lr_lambdas", []):  # transformers' step schedules are LambdaLR
            value = factor(step)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"the learning-rate factor at step {step} of a {steps}-step run is {value!r}, "
                                 "not a finite number >= 0")


def _valid_names(dataclass_types) -> list[str]:
    return [f.name for cls in dataclass_types for f in dataclasses.fields(cls)]


def _unknown_key_error(unknown: list[str], dataclass_types, where: str) -> ValueError:
    names = _valid_names(dataclass_types)
    hints = []
    for key in unknown:
        bare = key.lstrip("-").split("=", 1)[0].replace("-", "_")
        close = difflib.get_close_matches(bare, names, n=3)
        hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return ValueError(f"unknown configuration key(s) {where}: {'; '.join(hints)}")


CONFIG_HELP = ("Settings: --config PATH (or --config=PATH) reads a YAML file of the keys below; any key given as "
               "--key value on the command line overrides the file.")
PretrainConfig = tuple[ModelArguments, DataArguments, PretrainArguments]
DATACLASSES = (ModelArguments, DataArguments, PretrainArguments)


def parse_pretrain_args(argv: list[str] | None = None) -> PretrainConfig:
    """``--config file.yaml`` plus ``--key value`` overrides -> (ModelArguments, DataArguments, PretrainArguments).

    Raises ValueError for unknown keys (in the file or on the command line) or invalid values, before anything is
    built.
    """
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    path, argv = _pop_config_path(argv)
    parser = TrlParser(DATACLASSES, allow_abbrev=False)  # a misspelt key must not match a longer one
    parser.description = CONFIG_HELP  # --config is read above, not by the parser: --help names it here
    if path is not None:
        content = _read_config_file(path)
        for key, value in (content.pop("env", None) or {}).items():
            os.environ[key] = str(value)
        given = {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}
        if given & set(MODEL_SOURCE_KEYS):
            # A model source on the command line replaces the file's (exactly one source is allowed): e.g. the
            # tiny config's preset, continued from a finished run's final_model.
            replaced = {*MODEL_SOURCE_KEYS, *(("model_preset_kwargs",) if "model_preset" not in given else ())}
            content = {key: value for key, value in content.items() if key not in replaced}
        parser.set_defaults_with_config(**content)
    model_args, data_args, train_args, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if remaining:
        raise _unknown_key_error(remaining, DATACLASSES, "on the command line")
    return model_args, data_args, train_args


MODEL_SOURCE_KEYS = ("model_name_or_path", "vision_model_name_or_path", "text_model_name_or_path", "model_preset")


def _pop_config_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """The ``--config PATH`` / ``--config=PATH`` value and the other arguments."""
    for index, token in enumerate(argv):
        if token == "--config":
            if index + 1 >= len(argv):
                raise ValueError("--config needs a YAML file path")
            return argv[index + 1], argv[:index] + argv[index + 2:]
        if token.startswith("--config="):
            return token.split("=", 1)[1], argv[:index] + argv[index + 1:]
    return None, argv


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    import yaml

    with open(path, encoding="utf-8") as handle:
        content = yaml.safe_load(handle) or {}
    if not isinstance(content, dict):
        raise ValueError(f"config file {path} must hold a YAML mapping of keys to values")
    unknown = sorted(set(content) - set(_valid_names(DATACLASSES)) - {"env"})
    if unknown:
        raise _unknown_key_error(unknown, DATACLASSES, f"in {path}")
    return content


def config_as_dict(config: PretrainConfig) -> dict:
    """All values, flat, as written to checkpoints and trackers."""
    merged = {}
    for part in config:
        merged.update(dataclasses.asdict(part))
    return merged


__all__ = [
    "ATTENTION_MODES",
    "METRIC_SCHEDULERS",
    "DataArguments",
    "LOSS_REDUCTIONS",
    "ModelArguments",
    "PretrainArguments",
    "PretrainConfig",
    "STAGES",
    "config_as_dict",
    "parse_pretrain_args",
]
