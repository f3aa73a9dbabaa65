"""The pretraining loop: accelerate for devices, processes and trackers; the kit for loss, data position, checkpoints.

``run_pretraining(config)`` does, in order (every check that can fail runs before the first step):
resolve the checkpoint to resume and check it continues the same run (settings, output folder) -> name missing
local model paths -> load and check the corpus (packed for this run's image tokens and max_length) and the length of
the run -> build model + processor
-> check the checkpoint fits this model and stage -> freeze per stage -> shard/prepare -> optimizer + schedule ->
restore the checkpoint -> train, logging every step and checkpointing every ``save_steps`` -> final checkpoint and
``final_model``.

SIGTERM or SIGUSR1 (Slurm preemption or time limit) make every process stop after the current step, write a
checkpoint and exit with status 143; ``--resume`` continues from it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from ..cpu_runtime import prepare_cpu_training
from ..json_lines import read_json_lines
from .arguments import PretrainConfig, config_as_dict
from .checkpointing import (
    CHECKPOINTS,
    architecture,
    check_resumable,
    check_same_run,
    check_stage,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    remove_checkpoints_after,
    remove_unfinished,
    save_checkpoint,
    save_final_model,
)
from .data import (
    STOP_SIGNALS,
    GlobalMicroBatchSampler,
    MapStyleMicroBatches,
    StreamingMicroBatches,
    check_first_packs,
    check_packing_stats,
    load_packed_corpus,
    packing_stats,
)
from .flops import StepWork, attention_pairs_for_batch, peak_flops_per_device, training_flops
from .fsdp import WRAP_CLASS_NAMES, clip_grad_norm, no_gradient_sync, shard_model
from .loss import micro_batch_objective, summed_lm_loss, supervised_tokens
from .model_setup import (
    apply_stage,
    build_model,
    build_training_processor,
    compile_layers,
    enable_activation_checkpointing,
)
from .optim import apply_schedule_at_current_step, build_optimizer, build_scheduler, warmup_steps_for
from .run_logs import FINAL_MODEL, METRICS_FILE, RESOLVED_CONFIG, SAMPLES_FILE, JsonLinesLog
from .tracker_interval import IntervalMetrics

logger = logging.getLogger("recipes.pretrain")

# Where torch's single-kernel AdamW runs by default: ~10x faster than the per-tensor loop on the tiny CPU model.
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _tracker_config(config: PretrainConfig) -> dict:
    # TensorBoard's hparams accept only scalars and strings.
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_as_dict(config).items()}


def _tracker_init_kwargs(start_step: int) -> dict:
    """TensorBoard keeps every event file of the log folder: a resumed (or restarted) run's steps would show twice,
    the abandoned ones past the checkpoint next to the new ones. ``purge_step`` hides the earlier events from the
    first step this run logs on, as metrics.jsonl drops its lines past the checkpoint."""
    return {"tensorboard": {"purge_step": start_step + 1}}


MODEL_SOURCE_FIELDS = ("model_name_or_path", "vision_model_name_or_path", "text_model_name_or_path",
                       "tokenizer_name_or_path")


def _looks_local(source: str) -> bool:
    """A path rather than a hub id ("name" or "namespace/name")."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source)


def _check_local_model_sources(model_args) -> None:
    """Name a model or tokenizer path that does not exist, before the corpus is loaded: transformers would take it
    for a hub id and answer "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    for name in MODEL_SOURCE_FIELDS:
        source = getattr(model_args, name)
        if source and _looks_local(source) and not Path(source).expanduser().exists():
            raise FileNotFoundError(f"{name}={source}: no such file or folder")


class _Setup:
    """Everything the loop needs, built and checked before the first step."""

    def __init__(self, config: PretrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        model_args, data_args, args = config
        self.config, self.model_args, self.data_args, self.args = config, model_args, data_args, args
        launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
        if args.cpu_fsdp or (launched_processes > 1 and not torch.cuda.is_available()):
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # gloo process group under torchrun on CPU
        self.output_dir = Path(args.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=args.trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
        )
        acc = self.accelerator
        if launched_processes > 1 and acc.num_processes == 1:
            # Each process would believe it is alone and write the same files.
            raise RuntimeError(f"launched as {launched_processes} processes (WORLD_SIZE) but accelerate set up "
                               "a single-process run; launch with `accelerate launch` or set ACCELERATE_USE_CPU=true")
        prepare_cpu_training(acc.device, acc.mixed_precision)
        self.is_main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        set_seed(args.seed)
        if not self.is_main:  # one process reports
            logging.getLogger("recipes").setLevel(logging.WARNING)

        # 1. The checkpoint to resume, read first: a bad folder fails before anything heavy.
        self.resume_path = None
        if args.resume_from_checkpoint:
            self.resume_path = Path(args.resume_from_checkpoint)
        elif args.resume:
            self.resume_path = latest_checkpoint(self.output_dir)
            if self.resume_path is None:
                logger.info("--resume: no checkpoint in %s yet, starting from scratch", self.output_dir)
        self.resume_state = read_trainer_state(self.resume_path) if self.resume_path else None
        if self.resume_state is not None:  # the same run, or refused naming what changed
            check_stage(self.resume_path, self.resume_state, args.stage)
            check_same_run(self.resume_path, self.resume_state, config_as_dict(config), self.world)
        self.resume_in_output_dir = (self.resume_path is not None and self.resume_path.resolve().parent
                                     == (self.output_dir / CHECKPOINTS).resolve())
        # Checkpoints of another run: all of them on a fresh start, all of them when resuming from elsewhere.
        self.earlier_checkpoints = [] if self.resume_in_output_dir else complete_checkpoints(self.output_dir)
        if self.earlier_checkpoints and not args.overwrite_output_dir:
            # Two runs in one folder would mix: pruning would keep the other run's later steps, and a later
            # --resume (what a requeued job passes) would continue the other run.
            newest = self.earlier_checkpoints[-1].name
            if self.resume_path is None:
                raise ValueError(
                    f"{self.output_dir} holds checkpoints of an earlier run (newest: {newest}); continue it with "
                    "--resume, start over with --overwrite_output_dir (deletes them), or choose another output_dir"
                )
            raise ValueError(
                f"{self.output_dir} holds checkpoints of another run (newest: {newest}), and this run resumes from "
                f"{self.resume_path}, outside it; continue that run with --resume (no --resume_from_checkpoint), "
                "delete its checkpoints with --overwrite_output_dir, or choose another output_dir"
            )

        # 2. Data (and the length of the run), then the model.
        _check_local_model_sources(model_args)
        self.dataset = load_packed_corpus(data_args.dataset_name_or_path, data_args.dataset_config_name,
                                          data_args.dataset_split, data_args.streaming)
        if data_args.streaming and args.max_steps <= 0:
            raise ValueError("streaming=True needs max_steps > 0 (the stream's length is unknown, and the schedule "
                             "needs the number of steps)")
        if data_args.streaming and data_args.shuffle and self.is_main:
            # shuffle defaults to True: say that it does nothing here rather than let the run look shuffled.
            logger.warning("streaming=True reads the packs in shard order: shuffle=True applies to map-style corpora "
                           "only (datasets' shuffle buffer cannot resume exactly); shuffle the corpus when packing, "
                           "and pass --shuffle false to silence this")
        self.total_steps = self._total_steps()
        if self.resume_state is not None and int(self.resume_state["global_step"]) > self.total_steps:
            raise ValueError(
                f"checkpoint {self.resume_path} is at step {self.resume_state['global_step']}, past this run's "
                f"{self.total_steps} steps in all (max_steps={args.max_steps}, num_train_epochs="
                f"{args.num_train_epochs}): it belongs to a longer run; raise max_steps to continue it"
            )
        corpus_name = f"{data_args.dataset_name_or_path} (config {data_args.dataset_config_name})"
        corpus_stats = packing_stats(data_args.dataset_name_or_path, data_args.dataset_config_name,
                                     data_args.dataset_split)
        if corpus_stats is not None:  # what the corpus was packed for, known before the model is loaded
            check_packing_stats(corpus_name, corpus_stats, model_args.num_image_tokens, data_args.max_length)
        model = build_model(model_args)
        self.processor = build_training_processor(model_args, model)
        if self.resume_state is not None:
            check_resumable(self.resume_path, self.resume_state, model_config=model.config, stage=args.stage)
        counts = apply_stage(model, args.stage)
        logger.info("stage %s: %s trainable / %s frozen parameters", args.stage, f"{counts['trainable']:,}",
                    f"{counts['frozen']:,}")
        self.model_config = model.config
        self.pad_token_id = self.processor.tokenizer.pad_token_id

        from dataset_builders.packed_collator import PackedCollator

        # Flash-attention kernels need explicit document boundaries for isolated packs of more than one row.
        varlen = data_args.attention == "isolated" and model_args.attn_implementation.startswith("flash")
        # No padding mask: the model is causal and rows are right-padded (see PackedCollator's padding_mask).
        self.collator = PackedCollator(self.processor, attention=data_args.attention,
                                       max_length=data_args.max_length, return_flash_attn_kwargs=varlen,
                                       on_bad_document=data_args.on_bad_document, padding_mask=False)
        if corpus_stats is None:  # what its first packs say, read with this run's tokenizer
            check_first_packs(self.dataset, self.collator, corpus_name, data_args.max_length)
        # Its batches carry the uids of the documents they train on (samples.jsonl).
        if data_args.streaming:
            self.batches = StreamingMicroBatches(self.dataset, self.collator, data_args.per_device_train_batch_size,
                                                 self.rank, self.world)
        else:
            self.batches = MapStyleMicroBatches(self.dataset, self.collator, data_args.per_device_train_batch_size,
                                                self.rank, self.world, args.seed, data_args.shuffle,
                                                data_args.dataloader_num_workers)

        # 3. Wrap, then build the optimizer over the (possibly sharded) parameters.
        from accelerate.utils import DistributedType

        self.fsdp = acc.distributed_type == DistributedType.FSDP
        if args.activation_checkpointing and not self.fsdp:
            enable_activation_checkpointing(model)
        if args.compile_layers:
            logger.info("compile_layers: %d layers compiled in place (the first step compiles them)",
                        compile_layers(model, WRAP_CLASS_NAMES))
        betas = (args.adam_beta1, args.adam_beta2)
        fused = args.adam_fused if args.adam_fused is not None else acc.device.type in FUSED_ADAMW_DEVICES
        if self.fsdp:
            optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, betas, args.adam_epsilon, fused)
            model, optimizer = acc.prepare(model, optimizer)
        elif args.cpu_fsdp and self.world > 1:
            model = shard_model(model)
            optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, betas, args.adam_epsilon, fused)
        else:
            if args.cpu_fsdp:
                logger.warning("cpu_fsdp: a single process has nothing to shard; training unsharded")
            model = model.to(acc.device)
            optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, betas, args.adam_epsilon, fused)
            model, optimizer = acc.prepare(model, optimizer)
        self.model, self.optimizer = model, optimizer
        self.raw_optimizer = getattr(optimizer, "optimizer", optimizer)  # DCP needs the torch optimizer

        # 4. Schedule (its length is known since the corpus was loaded).
        warmup = warmup_steps_for(self.total_steps, args.warmup_ratio, args.warmup_steps)
        self.scheduler = build_scheduler(self.raw_optimizer, args.lr_scheduler_type, self.total_steps, warmup,
                                         args.lr_scheduler_kwargs)

        # 5. Restore.
        self.start_step = 0
        if self.is_main:  # step-N.tmp / step-N.deleting left by a kill while saving or deleting
            remove_unfinished(self.output_dir)
        if self.earlier_checkpoints and self.is_main:  # --overwrite_output_dir, now that everything is built
            logger.warning("--overwrite_output_dir: deleting %d checkpoint(s) of an earlier run in %s",
                           len(self.earlier_checkpoints), self.output_dir)
            remove_checkpoints_after(self.output_dir, -1)
        if self.resume_state is not None:
            trainer_state, data_state = load_checkpoint(self.resume_path, model=self.model,
                                                        optimizer=self.raw_optimizer, scheduler=self.scheduler,
                                                        grad_scaler=self.accelerator.scaler)
            self.batches.load_state_dict(data_state)
            self.start_step = int(trainer_state["global_step"])
            if self.is_main and self.resume_in_output_dir:
                for path in remove_checkpoints_after(self.output_dir, self.start_step):
                    logger.warning("deleted %s: this run continues from the earlier step %d", path.name,
                                   self.start_step)
            if trainer_state.get("total_steps") != self.total_steps:
                rates = apply_schedule_at_current_step(self.scheduler, self.raw_optimizer)
                logger.warning("the checkpoint's run had %s steps in all, this run has %s: the schedule differs "
                               "(learning rate from now on: this run's, %.3g at step %d)",
                               trainer_state.get("total_steps"), self.total_steps, rates[0], self.start_step + 1)
            logger.info("resumed from %s at step %d", self.resume_path, self.start_step)
        self.peak_flops = peak_flops_per_device(args.peak_tflops)

    def _total_steps(self) -> int:
        """Optimizer steps of the whole run: max_steps, or epochs of global micro-batches grouped by accumulation
        (a map-style epoch's last step takes what is left of it; a fraction of epochs rounds up, as the Trainer)."""
        args, data_args = self.args, self.data_args
        if args.max_steps > 0:
            return args.max_steps
        sampler = GlobalMicroBatchSampler(len(self.dataset), data_args.per_device_train_batch_size, self.rank,
                                          self.world, args.seed, data_args.shuffle)
        return math.ceil(math.ceil(sampler.per_epoch / args.gradient_accumulation_steps) * args.num_train_epochs)


class _StopRequest:
    """SIGTERM / SIGUSR1 (Slurm preemption, time limit) -> checkpoint at the end of the current step and exit."""

    SIGNALS = STOP_SIGNALS  # DataLoader workers ignore them (data.ignore_stop_signals)

    def __init__(self):
        self.requested, self.signal_name, self._previous = False, None, {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in self.SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        self.requested, self.signal_name = True, signal.Signals(number).name

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _epoch_end(batches, state: dict) -> bool:
    return state.get("kind") == "map" and state["micro_batches"] % batches.micro_batches_per_epoch == 0


def _next_step_batches(iterator, batches, accum: int) -> tuple[list[dict], dict]:
    """Up to ``accum`` micro-batches; a map-style epoch's last step takes what is left of the epoch."""
    step_batches, state = [], None
    while len(step_batches) < accum:
        batch, state = next(iterator)
        step_batches.append(batch)
        if _epoch_end(batches, state):
            break
    return step_batches, state


def _optimizer_step(setup: _Setup, step_batches: list[dict], stop_requested: bool) -> dict:
    """Forward/backward every micro-batch, clip, step; returns the step's numbers summed over processes."""
    acc, args, model = setup.accelerator, setup.args, setup.model
    device, isolated = acc.device, setup.data_args.attention == "isolated"
    local_tokens = sum(supervised_tokens(b["labels"]) for b in step_batches)
    step_tokens = int(acc.reduce(torch.tensor(local_tokens, device=device), "sum"))
    loss_sum_total = torch.zeros((), device=device)
    micro_mean_total = torch.zeros((), device=device)
    work = StepWork()
    for index, cpu_batch in enumerate(step_batches):
        batch = _to_device(cpu_batch, device)
        last_micro = index == len(step_batches) - 1
        with no_gradient_sync(model) if not last_micro else contextlib.nullcontext():
            loss_sum, num_tokens = summed_lm_loss(model, batch)
            objective = micro_batch_objective(loss_sum, num_tokens, reduction=args.loss_reduction,
                                              step_tokens=step_tokens, num_micro_batches=len(step_batches),
                                              world_size=setup.world)
            acc.backward(objective)
        loss_sum_total += loss_sum.detach()
        micro_mean_total += loss_sum.detach() / max(num_tokens, 1) / len(step_batches)
        work = work + StepWork(
            llm_positions=int(cpu_batch["num_real_tokens"]),
            attention_pairs=attention_pairs_for_batch(cpu_batch["input_ids"], cpu_batch.get("position_ids"),
                                                      setup.pad_token_id, isolated),
            images=0 if cpu_batch.get("pixel_values") is None else int(cpu_batch["pixel_values"].shape[0]),
            supervised_positions=num_tokens,
        )
    if acc.scaler is not None:
        acc.unscale_gradients()
    grad_norm = clip_grad_norm(model.parameters(), args.max_grad_norm)
    lr = setup.scheduler.get_last_lr()[0]
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    # One collective for everything reported (and for agreeing to stop on a signal).
    flops = training_flops(setup.model_config, work, args.stage)
    dropped = sum(int(b.get("documents_dropped", 0)) for b in step_batches)
    totals = acc.reduce(torch.tensor([loss_sum_total.item(), micro_mean_total.item(), work.llm_positions, flops,
                                      float(stop_requested), dropped], dtype=torch.float64, device=device), "sum")
    loss = totals[0] / max(step_tokens, 1) if args.loss_reduction == "token" else totals[1] / setup.world
    return {"loss": float(loss), "lr": lr, "grad_norm": grad_norm, "tokens": int(totals[2]),
            "supervised_tokens": step_tokens, "flops": float(totals[3]), "stop": float(totals[4]) > 0,
            "documents_dropped": int(totals[5])}


def _earlier_step_records(output_dir: Path, resume_path: Path) -> list[dict]:
    """metrics.jsonl of the run a resume continues: this output folder's, else the one the checkpoint lies in (a
    resume into a new folder); none when neither has it (the first tracker log then covers fewer steps)."""
    for folder in (output_dir, Path(resume_path).parent.parent):
        if (folder / METRICS_FILE).is_file():
            return [record for _, record in read_json_lines(folder / METRICS_FILE)]
    logger.info("no %s beside the checkpoint: the first tracker log covers only this run's steps", METRICS_FILE)
    return []


def run_pretraining(config: PretrainConfig) -> dict:
    """Train; returns a summary (steps, last loss, paths). See the module docstring for the order of work."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    setup = _Setup(config)
    acc, args, data_args = setup.accelerator, setup.args, setup.data_args
    model, scheduler = setup.model, setup.scheduler
    output_dir = setup.output_dir

    metrics = JsonLinesLog(output_dir / METRICS_FILE, enabled=setup.is_main)
    samples = JsonLinesLog(output_dir / SAMPLES_FILE, enabled=setup.is_main and data_args.log_sample_uids)
    if setup.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        for log in (metrics, samples):
            log.truncate_after(setup.start_step) if setup.start_step else log.reset()
        (output_dir / RESOLVED_CONFIG).write_text(yaml.safe_dump(config_as_dict(config), sort_keys=False))
    interval = IntervalMetrics(args.logging_steps)
    if setup.is_main and setup.start_step:  # only the main process logs to trackers
        interval.refill(_earlier_step_records(output_dir, setup.resume_path), setup.start_step)
    acc.init_trackers(args.run_name or output_dir.resolve().name, config=_tracker_config(config),
                      init_kwargs=_tracker_init_kwargs(setup.start_step))

    trainer_state = {
        "architecture": architecture(setup.model_config),
        "stage": args.stage,
        "world_size": setup.world,
        "per_device_train_batch_size": data_args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_steps": setup.total_steps,
        "config": config_as_dict(config),
    }

    def checkpoint(step: int, data_state: dict) -> None:
        path = save_checkpoint(output_dir, step, model=model, optimizer=setup.raw_optimizer, scheduler=scheduler,
                               trainer_state=dict(trainer_state, epoch=setup.batches.epoch_of(data_state)),
                               data_state=data_state, is_main=setup.is_main,
                               save_total_limit=args.save_total_limit, grad_scaler=setup.accelerator.scaler)
        logger.info("saved checkpoint %s", path)

    from tqdm.auto import tqdm

    progress = tqdm(total=setup.total_steps, initial=setup.start_step, disable=not setup.is_main, desc="pretrain",
                    dynamic_ncols=True)
    stop = _StopRequest()
    try:
        iterator = iter(setup.batches)
        step, data_state, last = setup.start_step, setup.batches.state_dict(), {}
        collator_stats = Counter()  # this process's documents kept and dropped, by reason
        model.train()
        while step < setup.total_steps:
            started = time.perf_counter()
            step_batches, data_state = _next_step_batches(iterator, setup.batches, args.gradient_accumulation_steps)
            step += 1
            for batch in step_batches:  # counted in the batches: a DataLoader worker's collator is a copy
                collator_stats.update(batch.get("stats", {}))
            numbers = _optimizer_step(setup, step_batches, stop_requested=stop.requested)
            seconds = time.perf_counter() - started
            tflops = numbers["flops"] / seconds / 1e12
            record = {
                "step": step,
                "epoch": setup.batches.epoch_of(data_state),
                "loss": numbers["loss"],
                "lr": numbers["lr"],
                "grad_norm": numbers["grad_norm"],
                "tokens": numbers["tokens"],
                "supervised_tokens": numbers["supervised_tokens"],
                "documents_dropped": numbers["documents_dropped"],  # bad documents (see PackedCollator)
                "tokens_per_s": numbers["tokens"] / seconds,
                "tflops_per_s": tflops,
                "mfu": tflops * 1e12 / (setup.world * setup.peak_flops) if setup.peak_flops else None,
                "seconds": seconds,
            }
            if torch.cuda.is_available():
                record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            metrics.write(record)
            interval.add(record)
            if data_args.log_sample_uids:
                from accelerate.utils import gather_object

                uids = gather_object([uid for b in step_batches for uid in b["uids"]])
                samples.write({"step": step, "uids": uids})
            if step % args.logging_steps == 0 or step == setup.total_steps:
                acc.log({f"train/{k}": v for k, v in interval.pop_summary().items() if v is not None}, step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            last = record
            if numbers["stop"] and step < setup.total_steps:  # a process got SIGTERM/SIGUSR1: all stop here
                checkpoint(step, data_state)
                progress.close()
                acc.end_training()
                logger.warning("stopped by signal %s after step %d; continue with --resume",
                               stop.signal_name or "(on another process)", step)
                raise SystemExit(143)
            if args.save_steps and step % args.save_steps == 0 and step < setup.total_steps:
                checkpoint(step, data_state)
        progress.close()
    finally:
        stop.restore()  # idempotent: the caller's handlers come back on any exit

    if step > setup.start_step and args.save_final_checkpoint:
        checkpoint(step, data_state)
    final_dir = None
    if args.save_final_model:
        final_dir = save_final_model(model, setup.processor, output_dir / FINAL_MODEL, setup.is_main)
        if final_dir is not None:
            logger.info("final model: %s (loads with trust_remote_code=True)", final_dir)
    acc.end_training()
    return {"steps": step, "last": last, "output_dir": str(output_dir),
            "final_model": str(final_dir) if final_dir else None,
            "collator_stats": dict(collator_stats), "model_args": asdict(setup.model_args)}


__all__ = ["FINAL_MODEL", "RESOLVED_CONFIG", "run_pretraining"]
