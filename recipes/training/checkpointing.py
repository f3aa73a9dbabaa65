"""Training checkpoints that resume exactly, and the final Hugging Face model folder.

A checkpoint ``<output_dir>/checkpoints/step-00000042/`` holds:

- ``model_optimizer/``: model and optimizer state through ``torch.distributed.checkpoint`` (DCP). Every process
  writes its own shards (FSDP parameters stay sharded, nothing is gathered), and DCP re-shards on load, so a
  checkpoint written by N processes loads on M. FQNs are the plain model's (``get_state_dict`` strips FSDP and
  activation-checkpointing wrappers).
- ``trainer_state.json``: step, epoch, scheduler state, the model's architecture, stage, batch geometry and the
  run's configuration; ``data_rank<r>.json``: each process's data position.
- ``rng_rank<r>.safetensors``: each process's torch (CPU and CUDA), numpy and python RNG states.

Nothing is pickled by the kit. A checkpoint is written into ``step-N.tmp`` and renamed when every process has
finished, and renamed to ``step-N.deleting`` before it is deleted, so a run killed while saving or deleting leaves
no half checkpoint that ``--resume`` could pick.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MODEL_OPTIMIZER = "model_optimizer"
DELETING_SUFFIX = ".deleting"  # a checkpoint being deleted (see remove_checkpoint)
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Fields that define the architecture: a checkpoint only resumes into a model with the same values.
ARCHITECTURE_FIELDS = {
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size", "hidden_act"),
    "text_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "hidden_act"),
    "": ("num_image_tokens", "vision_feature_layer", "image_token_id", "projector_hidden_act"),
}

# Settings a resumed run must share with the checkpoint's run, or it would not continue the same run (the
# optimizer's hyper-parameters and schedule come back from the checkpoint, the data order from its position).
# Everything else may change on resume: where and how often to write and log, how the same computation runs
# (attn_implementation, mixed_precision, compile_layers, activation_checkpointing, adam_fused, workers, cpu_fsdp),
# where the model and corpus are read from (their contents are checked: architecture, rows), and the length of the
# run (max_steps, num_train_epochs: the schedule then differs, which is logged). The stage is checked on its own.
RESUME_FIXED_SETTINGS = (
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_type",
    "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "max_grad_norm", "gradient_accumulation_steps",
    "loss_reduction", "seed", "num_image_tokens", "vision_feature_layer", "attention", "max_length",
    "dataset_config_name", "dataset_split", "streaming", "shuffle",
)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def architecture(config) -> dict:
    """The architecture-defining fields of an OpenQwen2VLConfig (or of its ``to_dict()``), flat."""
    as_dict = config if isinstance(config, dict) else config.to_dict()
    flat = {}
    for section, names in ARCHITECTURE_FIELDS.items():
        source = as_dict.get(section, {}) if section else as_dict
        for name in names:
            flat[f"{section}.{name}" if section else name] = source.get(name)
    return flat


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint folder so that no kill can leave it half-deleted yet "complete": it is first renamed to
    ``step-N.deleting`` (atomic; no longer a checkpoint name), then removed. A rename left over by a kill is cleaned
    by ``remove_unfinished``. Deleting in place would not do: ``rmtree`` may reach ``trainer_state.json`` last, and
    a kill before that leaves a gutted folder that ``--resume`` picks and fails on at every requeue."""
    path = Path(path)
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)  # an earlier interrupted deletion of the same step
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_checkpoints_after(output_dir: str | Path, step: int) -> list[Path]:
    """Delete complete checkpoints later than ``step`` (call on the main process only): a run resumed from an
    earlier checkpoint continues from there, and ``--resume`` must not later pick the abandoned continuation."""
    removed = []
    for path in complete_checkpoints(output_dir):
        if int(_STEP_DIR.match(path.name).group(1)) > step:
            remove_checkpoint(path)
            removed.append(path)
    return removed


def remove_unfinished(output_dir: str | Path) -> list[Path]:
    """Delete ``step-N.tmp`` folders left by a run killed while saving and ``step-N.deleting`` ones left by a kill
    while deleting (call on the main process only)."""
    root = Path(output_dir) / CHECKPOINTS
    removed = []
    if root.is_dir():
        for pattern in ("step-*.tmp", f"step-*{DELETING_SUFFIX}"):
            for path in sorted(root.glob(pattern)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states as tensors + string metadata (safetensors-friendly)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python_state"] = torch.tensor(internal, dtype=torch.int64)
    metadata = {"numpy_kind": str(kind), "numpy_pos": str(pos), "numpy_has_gauss": str(has_gauss),
                "numpy_cached_gaussian": repr(float(cached)), "python_version": str(version),
                "python_gauss_next": repr(gauss_next)}
    return tensors, metadata


def set_rng_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    np.random.set_state((metadata["numpy_kind"], tensors["numpy_keys"].numpy().astype(np.uint32),
                         int(metadata["numpy_pos"]), int(metadata["numpy_has_gauss"]),
                         float(metadata["numpy_cached_gaussian"])))
    gauss_next = None if metadata["python_gauss_next"] == "None" else float(metadata["python_gauss_next"])
    random.setstate((int(metadata["python_version"]),
                     tuple(int(x) for x in tensors["python_state"].tolist()), gauss_next))


def save_checkpoint(output_dir: str | Path, step: int, *, model, optimizer, scheduler, trainer_state: dict,
                    data_state: dict, is_main: bool, save_total_limit: int | None = None,
                    grad_scaler=None) -> Path:
    """Write checkpoint ``step`` (collective: every process calls it). Returns the final folder. ``grad_scaler``:
    fp16's loss scaler, whose scale and growth counter decide the next steps (the same on every process)."""
    final = checkpoint_path(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _single_process_is_intended():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / MODEL_OPTIMIZER))
    rank = _rank()
    (tmp / f"data_rank{rank}.json").write_text(json.dumps(data_state), encoding="utf-8")
    tensors, metadata = rng_state()
    save_file(tensors, str(tmp / f"rng_rank{rank}.safetensors"), metadata=metadata)
    _barrier()
    if is_main:
        state = dict(trainer_state, global_step=step, scheduler=scheduler.state_dict())
        if grad_scaler is not None:
            state["grad_scaler"] = grad_scaler.state_dict()
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
        if final.exists():
            remove_checkpoint(final)
        tmp.rename(final)
        if save_total_limit:
            for old in complete_checkpoints(output_dir)[:-save_total_limit]:
                if old != final:  # never the one just written, whatever else the folder holds
                    remove_checkpoint(old)
    _barrier()
    return final


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns on every save/load without a process group ("assuming the intent is to save in a single process"):
    a one-process run is intended, so that warning is silenced here, and only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def read_trainer_state(path: str | Path) -> dict:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a finished checkpoint (no {STATE_FILE})")
    return json.loads(state_file.read_text(encoding="utf-8"))


def check_resumable(path: str | Path, trainer_state: dict, *, model_config, stage: str) -> None:
    """Raise ValueError when checkpoint ``path`` was written for another architecture or stage."""
    saved, current = trainer_state.get("architecture", {}), architecture(model_config)
    # Only the fields the checkpoint recorded (older checkpoints lack the activations).
    differences = [f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
                   for key, value in current.items() if key in saved and saved[key] != value]
    if differences:
        raise ValueError(f"checkpoint {path} was written for a different model config; "
                         + "; ".join(differences))
    check_stage(path, trainer_state, stage)


def check_stage(path: str | Path, trainer_state: dict, stage: str) -> None:
    if trainer_state.get("stage") != stage:
        raise ValueError(f"checkpoint {path} was written by stage {trainer_state.get('stage')!r}, this run is stage "
                         f"{stage!r} (other trainable parameters); start the new stage from its final_model with "
                         "model_name_or_path instead of resuming")


def check_same_run(path: str | Path, trainer_state: dict, config: dict, world_size: int) -> None:
    """Raise ValueError naming every setting in ``RESUME_FIXED_SETTINGS`` (and the global micro-batch) that differs
    from the checkpoint's run: resuming would restore the checkpoint's values for some (optimizer hyper-parameters,
    schedule) and silently change the run for others. ``config``: this run's ``config_as_dict``."""
    saved = trainer_state.get("config") or {}
    current = json.loads(json.dumps(config, default=str))  # as the checkpoint stored it (JSON)
    # A stream is read in shard order whatever shuffle says: changing it (e.g. to silence the warning) is harmless.
    inert = {"shuffle"} if saved.get("streaming") and current.get("streaming") else set()
    changes = [f"{key}: {saved[key]!r} -> {current.get(key)!r}"
               for key in RESUME_FIXED_SETTINGS if key in saved and key not in inert and saved[key] != current.get(key)]
    # The data position counts global micro-batches (processes x per-device packs): other process counts resume as
    # long as that product is the same (a streaming position: only with the same processes and batch).
    old_world, old_batch = trainer_state.get("world_size"), trainer_state.get("per_device_train_batch_size")
    new_batch = current.get("per_device_train_batch_size")
    if old_world is not None and old_batch is not None:
        same = ((old_world, old_batch) == (world_size, new_batch) if current.get("streaming")
                else old_world * old_batch == world_size * new_batch)
        if not same:
            changes.append(f"processes x per_device_train_batch_size: {old_world} x {old_batch} -> {world_size} x "
                           f"{new_batch}" + ("" if current.get("streaming") else
                                             f" (a global micro-batch of {old_world * old_batch} packs is needed)"))
    if changes:
        raise ValueError(f"cannot resume from {path}: this run's settings differ from the checkpoint's run, which "
                         f"would make it another run: {'; '.join(changes)}. Resume with the checkpoint's values, or "
                         "start a new run (another output_dir, e.g. from a final_model with --model_name_or_path)")


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler, grad_scaler=None) -> tuple[dict, dict]:
    """Restore model, optimizer, scheduler, ``grad_scaler`` (fp16) and this process's RNG in place; returns
    (trainer_state, data_state)."""
    path = Path(path)
    trainer_state = read_trainer_state(path)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    stored = dcp.FileSystemReader(str(path / MODEL_OPTIMIZER)).read_metadata().state_dict_metadata
    missing = [key for key in model_state if f"model.{key}" not in stored]
    if missing:
        raise ValueError(f"checkpoint {path} lacks model weights {missing[:5]} ({len(missing)} in all)")
    # Optimizer entries of parameters that never received a gradient are absent from the checkpoint; they keep the
    # fresh (zero) state, as they would have in an uninterrupted run.
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(path / MODEL_OPTIMIZER), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    if grad_scaler is not None:
        _load_grad_scaler(path, grad_scaler, trainer_state)
    rank = _rank()
    data_state = _data_position(path, rank, trainer_state)
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        from safetensors import safe_open

        with safe_open(str(rng_file), framework="pt") as handle:
            metadata = handle.metadata()
        set_rng_state(load_file(str(rng_file)), metadata)
    return trainer_state, data_state


def _load_grad_scaler(path: Path, grad_scaler, trainer_state: dict) -> None:
    saved = trainer_state.get("grad_scaler")
    if saved:
        grad_scaler.load_state_dict(saved)
    else:  # written by a bf16/fp32 run, or before the scale was saved: the scale restarts and finds its level again
        logger.warning("checkpoint %s holds no fp16 loss scale: this run starts from the initial scale %g, so its "
                       "first steps may differ from an uninterrupted run's", path, grad_scaler.get_scale())


def _data_position(path: Path, rank: int, trainer_state: dict) -> dict:
    """This process's data position. A map-style position counts global micro-batches, the same on every process,
    so a run scaled out to more processes (same global micro-batch) starts the new ones from process 0's; a
    streaming position is per process and cannot be shared."""
    data_file = path / f"data_rank{rank}.json"
    if data_file.is_file():
        return json.loads(data_file.read_text(encoding="utf-8"))
    first = path / "data_rank0.json"
    if rank > 0 and first.is_file():
        state = json.loads(first.read_text(encoding="utf-8"))
        if state.get("kind") == "map":
            return state
    raise FileNotFoundError(f"{path} has no data position for process {rank} ({data_file.name}): it was written "
                            f"by {trainer_state.get('world_size')} processes, and a streaming position resumes only "
                            "with as many")


def save_final_model(model, processor, directory: str | Path, is_main: bool) -> Path | None:
    """Gather the full weights (collective) and write an HF folder that loads with ``trust_remote_code=True``."""
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    directory = Path(directory)
    if is_main:
        from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration

        config = copy.deepcopy(getattr(model, "module", model).config)  # DDP wraps the model (FSDP2 does not)
        config.use_cache = True
        config.text_config.use_cache = True
        # A fresh, unwrapped instance: FSDP and activation-checkpoint wrappers must not leak into the saved code.
        with torch.device("meta"):
            fresh = OpenQwen2VLForConditionalGeneration(config)
        fresh.load_state_dict(state_dict, strict=False, assign=True)
        fresh.tie_weights()
        missing = [n for n, p in fresh.named_parameters() if p.device.type == "meta"]
        if missing:
            raise RuntimeError(f"final model is missing weights for {missing[:5]}")
        directory.mkdir(parents=True, exist_ok=True)
        fresh.save_pretrained(directory)
        if processor is not None:
            processor.save_pretrained(directory)
    _barrier()
    return directory if is_main else None


__all__ = ["RESUME_FIXED_SETTINGS", "architecture", "check_resumable", "check_same_run", "check_stage",
           "checkpoint_path", "complete_checkpoints", "latest_checkpoint", "load_checkpoint", "read_trainer_state",
           "remove_checkpoint", "remove_checkpoints_after", "remove_unfinished", "rng_state", "save_checkpoint",
           "save_final_model", "set_rng_state"]
