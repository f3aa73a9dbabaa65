"""Open-Qwen2VL supervised fine-tuning with TRL's SFTTrainer (stage 2: 729 visual tokens, instruction data).

    accelerate launch [--config_file recipes/accelerate/<topology>.yaml] recipes/sft.py \\
        --config recipes/configs/sft_mammoth.yaml [--any_SFTConfig_or_script_field value ...]

Every ``SFTConfig`` / ``ModelConfig`` field and the script fields below can be set in the YAML or overridden on the
command line (TRL's ``TrlParser``). What the kit adds to plain TRL:

* data: LLaVA-665k JSON, MAmmoTH-VL (JSON or the original per-sample split), TRL ``messages`` + ``images``; loaded
  with ``datasets`` (``--dataset_streaming`` for corpora that do not fit), images decoded batch by batch;
* labels only on assistant turns (with their ``<|im_end|>``), never on image placeholders, system/user text or
  padding (``--completion_only_loss false``: on all text, never on image placeholders or padding);
  ``--chat_format compat`` reproduces the original SFT strings, ``chatml`` is clean ChatML;
* ``--packing`` (and ``--eval_packing``) packs conversations in isolated mode (positions restart per conversation,
  no cross-attention); ``--padding_free`` without packing lays each batch out the same way, without padding;
* bad samples raise an error naming them, or are counted and skipped with ``--skip_bad_samples``;
* vision tower frozen unless ``--train_vision``; ``--use_peft`` puts LoRA on the language model only (QLoRA with
  ``--load_in_4bit``); adapters are merged into a full checkpoint (``--merge_lora``);
* the output folder loads with ``AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch recipes/sft.py): make the kit importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate import PartialState
from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_quantization_config

from recipes.cpu_runtime import prepare_cpu_training
from recipes.process_exit import destroy_process_group_if_any
from recipes.sft_data import (
    PackedSFTCollator,
    SFTCollator,
    SFTEncoder,
    SkipLog,
    encode_sft_dataset,
    load_raw_sft_dataset,
)
from recipes.sft_cpu_head import enable_compact_lm_head_on_cpu
from recipes.sft_model import build_lora_config, load_model_and_processor, set_trainable, trainable_counts
from recipes.training.model_setup import freeze_unread_vision_parameters
from recipes.training.run_logs import SFT_TRAINING_LOG, JsonLinesLog

logger = logging.getLogger("recipes.sft")
EASY_VQA = "easy_vqa"


@dataclass
class SFTScriptArguments(ScriptArguments):
    """Data and model options of the kit's SFT recipe (TRL's ``ScriptArguments`` plus the fields below).

    ``dataset_name`` is a data file (``.json``, ``.jsonl``, ``.parquet``, a glob), a ``datasets`` folder or hub id,
    or ``easy_vqa`` (writes the easy-vqa training questions into ``<output_dir>/easy_vqa_data`` first).
    """

    dataset_format: str = field(default="auto", metadata={
        "help": "auto | llava | mammoth | mammoth_split | messages (see recipes/sft_data/formats.py)"})
    image_root: str | None = field(default=None, metadata={"help": "folder that relative image paths start from"})
    sample_dir: str | None = field(default=None, metadata={
        "help": "mammoth_split only: folder of the per-sample JSON files the index points to"})
    eval_dataset_name: str | None = field(default=None, metadata={
        "help": "optional evaluation data, same layout and image_root as the training data (a folder or hub id "
                "gives its dataset_test_split; easy_vqa, with dataset_name easy_vqa, its test split)"})
    chat_format: str = field(default="chatml", metadata={
        "help": "chatml (clean ChatML, new training) or compat (the original's SFT strings, for released checkpoints)"})
    num_image_tokens: int | None = field(default=None, metadata={
        "help": "visual tokens per image (729 for the paper's SFT); a config change of the checkpoint, no new weights"})
    init_from_preset: str | None = field(default=None, metadata={
        "help": "build a random model (tiny | open_qwen2vl_2b) when no model_name_or_path is given (smoke tests)"})
    train_vision: bool = field(default=False, metadata={"help": "also train the SigLIP tower (frozen by default)"})
    skip_bad_samples: bool = field(default=False, metadata={
        "help": "skip and count bad samples instead of stopping at the first one"})
    packing_algorithm: str = field(default="default", metadata={"help": "default | exact | ffd | bfd"})
    packing_buffer_size: int = field(default=10_000, metadata={"help": "streaming packing: samples per buffer"})
    merge_lora: bool = field(default=True, metadata={
        "help": "with --use_peft: write the merged full model to output_dir (adapter in output_dir/adapter)"})
    shuffle_buffer_size: int = field(default=10_000, metadata={
        "help": "streaming with --shuffle_dataset: samples in the shuffle buffer"})
    easy_vqa_limit: int | None = field(default=None, metadata={"help": "dataset_name=easy_vqa: conversations to write"})


class SkipReport(TrainerCallback):
    """Writes ``skipped_samples.json`` (counts and examples) into the output folder at the end of training, merging
    the skips of every rank and DataLoader worker (spooled under ``skipped_samples.parts/``)."""

    def __init__(self, skip_log: SkipLog):
        self.skip_log = skip_log

    def on_train_end(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()  # every rank has spooled its skips
        if state.is_world_process_zero:
            logger.info(self.skip_log.summary())
            self.skip_log.write(Path(args.output_dir) / "skipped_samples.json")


class TrainingLog(TrainerCallback):
    """Appends every logged record (loss, learning rate, grad norm...) to ``output_dir/training_log.jsonl``
    (``SFT_TRAINING_LOG``).

    Trainer keeps its log history only in checkpoints; this file is there even when nothing is saved (plots, demo).
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            path = Path(args.output_dir) / SFT_TRAINING_LOG
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def _data_seed(training_args: SFTConfig) -> int:
    """The seed of the data order: ``data_seed``, or ``seed`` when it is unset (as the Trainer's sampler does)."""
    return training_args.seed if training_args.data_seed is None else training_args.data_seed


def _prepare_data(source, split, script_args, training_args, encoder, skip_log, packing: bool,
                  streaming: bool | None = None):
    streaming = script_args.dataset_streaming if streaming is None else streaming
    raw = load_raw_sft_dataset(source, split=split, streaming=streaming, config_name=script_args.dataset_config)
    if streaming and training_args.shuffle_dataset:  # map-style data is shuffled by the sampler
        from recipes.sft_data.loading import number_rows  # bad rows are then named by their row in the source

        raw = number_rows(raw).shuffle(seed=_data_seed(training_args), buffer_size=script_args.shuffle_buffer_size)
    encoded = encode_sft_dataset(
        raw, encoder, data_format=script_args.dataset_format, image_root=script_args.image_root,
        sample_dir=script_args.sample_dir, skip_bad_samples=script_args.skip_bad_samples, skip_log=skip_log,
        num_proc=training_args.dataset_num_proc,
    )
    if packing:
        from recipes.sft_data.packing import pack_sft_dataset

        encoded = pack_sft_dataset(encoded, capacity=training_args.max_length, algorithm=script_args.packing_algorithm,
                                   buffer_size=script_args.packing_buffer_size)
    return encoded


def _maybe_write_easy_vqa(script_args, training_args) -> None:
    """``easy_vqa`` as ``dataset_name`` (its train split) or ``eval_dataset_name`` (its test split): written to
    ``output_dir/easy_vqa_data`` first (the two splits share its ``--image_root``)."""
    train = script_args.dataset_name == EASY_VQA and not os.path.exists(EASY_VQA)
    evaluate = script_args.eval_dataset_name == EASY_VQA and not os.path.exists(EASY_VQA)
    if not (train or evaluate):
        return
    if evaluate and not train:
        raise ValueError("--eval_dataset_name easy_vqa goes with --dataset_name easy_vqa: the two splits share "
                         "--image_root; for other training data, write its test split with `python -m "
                         "recipes.sft_data.easy_vqa --split test` into your data's image root")
    from recipes.sft_data.easy_vqa import write_easy_vqa_sft

    folder = Path(training_args.output_dir) / "easy_vqa_data"
    with training_args.main_process_first(desc="write easy-vqa SFT data"):
        script_args.dataset_name = str(write_easy_vqa_sft(folder, "train", limit=script_args.easy_vqa_limit))
        if evaluate:
            script_args.eval_dataset_name = str(write_easy_vqa_sft(folder, "test", limit=script_args.easy_vqa_limit))
    script_args.image_root = str(folder)
    script_args.dataset_format = "messages"


def _skip_log(training_args) -> SkipLog:
    """A skip log whose records reach ``skipped_samples.json`` from worker processes and other ranks too; a fresh run
    starts from an empty spool, a resumed one keeps the skips met before the interruption."""
    spool = Path(training_args.output_dir) / "skipped_samples.parts"
    if not training_args.resume_from_checkpoint and PartialState().is_main_process:
        shutil.rmtree(spool, ignore_errors=True)
    PartialState().wait_for_everyone()  # no rank spools a skip before the stale ones are gone
    return SkipLog(spool_dir=spool)


def _resume_path(training_args) -> str | None:
    """The checkpoint to resume from: ``latest`` (or ``true``) is the newest ``checkpoint-*`` of ``output_dir``
    (None, a fresh start, when there is none yet); a given folder must exist (checked before any data is encoded)."""
    resume = training_args.resume_from_checkpoint
    if resume in (None, "", "false", "False", "0"):
        return None
    if resume in ("latest", "true", "True", "1"):
        resume = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if resume is None:
            logger.warning("resume requested but %s holds no checkpoint-*; starting fresh", training_args.output_dir)
        return resume
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE_NAME)):
        raise ValueError(f"--resume_from_checkpoint {resume}: not a Trainer checkpoint folder "
                         f"(no {TRAINER_STATE_NAME})")
    return resume


def _finished_at(checkpoint: str | None, training_args) -> int | None:
    """The step of ``checkpoint`` when it is at or past ``max_steps`` (runs measured in epochs are left to the
    Trainer: their length may have changed since)."""
    if not checkpoint or training_args.max_steps <= 0:
        return None
    state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    return state.global_step if state.global_step >= training_args.max_steps else None


def _reset_training_log(training_args) -> None:
    """A fresh run starts an empty ``training_log.jsonl``; a resumed one keeps the records up to its checkpoint's step
    (an interrupted run logged steps past its last checkpoint, and the resumed run logs them again)."""
    if not PartialState().is_main_process:
        return
    log = JsonLinesLog(Path(training_args.output_dir) / SFT_TRAINING_LOG)
    if training_args.resume_from_checkpoint:
        state = TrainerState.load_from_json(os.path.join(training_args.resume_from_checkpoint, TRAINER_STATE_NAME))
        dropped = log.truncate_after(state.global_step)
        if dropped:
            logger.info("dropped %d %s record(s) written after the checkpoint", dropped, SFT_TRAINING_LOG)
    else:
        log.reset()


def _assistant_only_labels(training_args: SFTConfig) -> bool:
    """Whether labels cover only the assistant turns (the default: TRL's ``completion_only_loss`` unset or true, the
    assistant turns being a conversation's completions) or, with ``completion_only_loss=False``, all text."""
    if training_args.completion_only_loss is False:
        if training_args.assistant_only_loss:
            raise ValueError("completion_only_loss=false (loss on the whole conversation) contradicts "
                             "assistant_only_loss=true")
        return False
    return True


def _refuse_unsupported_options(training_args: SFTConfig, model_args: ModelConfig) -> None:
    """TRL options the kit cannot apply to image conversations: refused, never silently ignored."""
    if training_args.packing_strategy != "bfd":
        raise ValueError(f"packing_strategy={training_args.packing_strategy!r} packs a token stream, cutting "
                         "conversations (and their images) apart; the kit packs whole conversations (isolated "
                         "packing): choose its bin packing with --packing_algorithm default|exact|ffd|bfd")
    if training_args.chat_template_path:
        raise ValueError("chat_template_path: the kit renders conversations with its own templates (--chat_format "
                         "compat|chatml), which the saved model then carries; a custom template would train the "
                         "model in one format and save it with another")
    if (training_args.packing or training_args.eval_packing) and not training_args.max_length:
        raise ValueError("--packing / --eval_packing need --max_length: it is the capacity of a pack")
    if model_args.use_peft and model_args.lora_target_parameters:
        raise ValueError("lora_target_parameters (LoRA on bare nn.Parameters, e.g. MoE experts) has no target in "
                         "Open-Qwen2VL; choose linears with --lora_target_modules")


def _set_pad_token(processor, pad_token: str) -> None:
    tokenizer = processor.tokenizer
    if pad_token not in tokenizer.get_vocab():
        raise ValueError(f"--pad_token {pad_token!r} is not a token of the tokenizer's vocabulary")
    tokenizer.pad_token = pad_token


def _collator(processor, num_image_tokens: int, training_args: SFTConfig, script_args: SFTScriptArguments,
              skip_log: SkipLog, packed: bool, padding_free: bool) -> SFTCollator:
    """The kit's collator for both splits: the packed one collates unpacked rows too (padded, or with
    ``padding_free`` laid out in one row like a pack, as TRL's padding-free collator does)."""
    common = dict(num_image_tokens=num_image_tokens, pad_to_multiple_of=training_args.pad_to_multiple_of,
                  skip_bad_samples=script_args.skip_bad_samples, skip_log=skip_log)
    if packed or padding_free:
        return PackedSFTCollator(processor, padding_free=padding_free, **common)
    return SFTCollator(processor, **common)


def build_trainer(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> SFTTrainer:
    """Model, data, collator and an ``SFTTrainer`` ready to ``train()``."""
    _refuse_unsupported_options(training_args, model_args)
    assistant_only = _assistant_only_labels(training_args)
    quantization = get_quantization_config(model_args)
    if quantization is not None and not model_args.use_peft:
        raise ValueError("load_in_4bit / load_in_8bit (QLoRA) needs --use_peft")
    # Resolved once: `latest` becomes a checkpoint folder, or None (a fresh start) when output_dir has none yet.
    training_args.resume_from_checkpoint = _resume_path(training_args)
    _maybe_write_easy_vqa(script_args, training_args)
    if not script_args.dataset_name:
        raise ValueError("set --dataset_name (a data file, folder or hub id, or easy_vqa)")

    model, processor = load_model_and_processor(
        model_args.model_name_or_path, init_from_preset=script_args.init_from_preset,
        num_image_tokens=script_args.num_image_tokens, chat_format=script_args.chat_format,
        trust_remote_code=training_args.trust_remote_code, dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation, quantization_config=quantization, seed=training_args.seed,
        revision=model_args.model_revision,
    )
    peft_config = None
    if model_args.use_peft:
        peft_config = build_lora_config(
            r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules, modules_to_save=model_args.lora_modules_to_save,
            train_vision=script_args.train_vision, use_rslora=model_args.use_rslora, use_dora=model_args.use_dora,
            tied_embeddings=bool(model.config.tie_word_embeddings), task_type=model_args.lora_task_type,
        )
        if training_args.world_size > 1 and script_args.merge_lora and not model_args.model_name_or_path:
            raise ValueError("merging LoRA after a multi-process run needs a saved base (--model_name_or_path)")
    else:
        set_trainable(model, train_vision=script_args.train_vision)

    # TRL refuses packing for image datasets and would tokenize the data itself: the kit packs and encodes instead
    # (and labels the assistant turns itself: TRL's assistant_only_loss check would look for raw `messages`).
    # TRL also refuses padding_free with a custom collator: the kit's packed collator lays batches out padding-free.
    packing, assistant_only_loss = training_args.packing, training_args.assistant_only_loss
    padding_free = training_args.padding_free
    eval_packing = packing if training_args.eval_packing is None else training_args.eval_packing
    training_args.packing = False
    training_args.assistant_only_loss = False
    training_args.padding_free = False
    if training_args.pad_token:  # TRL applies it only to its own collator; the kit's pads with the tokenizer's
        _set_pad_token(processor, training_args.pad_token)
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    if script_args.dataset_streaming and training_args.max_steps <= 0:
        raise ValueError("--dataset_streaming needs --max_steps (a stream has no length)")

    skip_log = _skip_log(training_args)
    encoder = SFTEncoder(processor, script_args.chat_format, max_length=training_args.max_length,
                         num_image_tokens=model.config.num_image_tokens, assistant_only=assistant_only)
    with training_args.main_process_first(desc="encode SFT data"):
        train_dataset = _prepare_data(script_args.dataset_name, script_args.dataset_train_split, script_args,
                                      training_args, encoder, skip_log, packing)
        eval_dataset = None
        if script_args.eval_dataset_name:  # a folder or hub id with several splits gives its test split
            # Map-style even with --dataset_streaming: a stream's length is unknown, so with several processes
            # the wrap-around samples that even out the last batch could not be told apart and were scored twice.
            eval_dataset = _prepare_data(script_args.eval_dataset_name, script_args.dataset_test_split, script_args,
                                         training_args, encoder, skip_log, eval_packing, streaming=False)
    if eval_dataset is not None and (eval_packing or padding_free) and training_args.world_size > 1 \
            and training_args.per_device_eval_batch_size != 1:
        # The packed collator makes one row of a batch's packs, and the Trainer drops the wrap-around duplicates
        # that even out the last batch row by row: with one pack per batch, a duplicate is a whole row.
        logger.warning("--eval_packing/--padding_free on %d processes: per_device_eval_batch_size %d -> 1 (one pack "
                       "per eval batch, so no pack is scored twice)", training_args.world_size,
                       training_args.per_device_eval_batch_size)
        training_args.per_device_eval_batch_size = 1
    collator = _collator(processor, model.config.num_image_tokens, training_args, script_args, skip_log,
                         packed=packing or (eval_packing and eval_dataset is not None), padding_free=padding_free)
    enable_compact_lm_head_on_cpu()  # TRL scores every position on CPU; only the supervised ones matter
    _reset_training_log(training_args)
    trainer = SFTTrainer(
        model=model, args=training_args, data_collator=collator, train_dataset=train_dataset,
        eval_dataset=eval_dataset, processing_class=processor, peft_config=peft_config,
        callbacks=[SkipReport(skip_log), TrainingLog()],
    )
    trainer.kit_packing = packing
    # TRL reads these only while it is built; restored, the saved training_args.bin records what the run did
    training_args.packing, training_args.assistant_only_loss = packing, assistant_only_loss
    training_args.padding_free = padding_free
    if peft_config is not None:  # peft's trainable copy of the tower (--train_vision) has the unread layers too
        freeze_unread_vision_parameters(trainer.model)
    logger.info("trainable parameters: %s", trainable_counts(trainer.model))
    return trainer


def _save_folder(trainer: SFTTrainer, folder: Path) -> None:
    """``trainer.save_model`` except under FSDP, where any state-dict type is gathered to full weights first
    (``save_model`` writes no weights for a sharded state dict, and an HF folder needs full ones)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        trainer.save_model(str(folder))
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank calls it
    if trainer.accelerator.is_main_process:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(folder, state_dict=state_dict)
        trainer.processing_class.save_pretrained(folder)
    trainer.accelerator.wait_for_everyone()


def save_outputs(trainer: SFTTrainer, script_args: SFTScriptArguments, model_args: ModelConfig) -> Path:
    """Full fine-tuning: the model + processor in ``output_dir``. LoRA: the adapter in ``output_dir/adapter`` and,
    with ``merge_lora``, the merged model in ``output_dir``. Returns the folder to load the model from."""
    from accelerate.utils import is_peft_model

    out = Path(trainer.args.output_dir)
    if not is_peft_model(trainer.accelerator.unwrap_model(trainer.model)):
        _save_folder(trainer, out)
        return out
    adapter_dir = out / "adapter"
    _save_folder(trainer, adapter_dir)
    if not script_args.merge_lora:
        return adapter_dir
    if trainer.accelerator.is_main_process:
        if trainer.accelerator.num_processes == 1:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        else:  # the trained weights are sharded across ranks: merge the saved adapter into a fresh base instead
            from peft import PeftModel
            from transformers import AutoModelForImageTextToText

            dtype = {} if model_args.dtype in (None, "auto") else {"dtype": getattr(torch, model_args.dtype)}
            base = AutoModelForImageTextToText.from_pretrained(  # as the run loaded it (its --dtype too)
                model_args.model_name_or_path, num_image_tokens=trainer.model.config.num_image_tokens,
                trust_remote_code=trainer.args.trust_remote_code, revision=model_args.model_revision, **dtype)
            merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(out)
        trainer.processing_class.save_pretrained(out)
    trainer.accelerator.wait_for_everyone()
    return out


def parse_args(argv: list[str] | None = None) -> tuple[SFTScriptArguments, SFTConfig, ModelConfig]:
    """The recipe's settings: ``--config PATH`` (YAML) overridden by ``--key value`` on the command line."""
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))
    parser.description = ("Settings: --config PATH reads a YAML file of the keys below (TRL's TrlParser); any key "
                          "given as --key value on the command line overrides the file.")
    return parser.parse_args_and_config(argv)


def main(argv: list[str] | None = None) -> Path:
    script_args, training_args, model_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare_cpu_training(training_args.device,
                         "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None)
    trainer = build_trainer(script_args, training_args, model_args)
    resume = training_args.resume_from_checkpoint  # resolved by build_trainer
    finished = _finished_at(resume, training_args)
    if finished is None:
        trainer.train(resume_from_checkpoint=resume)
    else:  # e.g. a requeued job: the Trainer would train one step past the end
        logger.warning("%s is the run's last step (%d): nothing left to train; its weights become the saved model",
                       resume, finished)
        trainer._load_from_checkpoint(resume)  # the Trainer's own reader of its checkpoints (full or adapter)
    out = save_outputs(trainer, script_args, model_args)
    trainer.accelerator.print(f"SFT done; model saved to {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    finally:  # see recipes/process_exit.py
        destroy_process_group_if_any()
