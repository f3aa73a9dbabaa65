"""User journeys through recipes/sft.py that the other SFT tests do not take, each checked against an independent
computation: gradient accumulation and evaluation losses recomputed by hand from the processor's own encoding,
0/1/2-image conversations with bad rows named and counted, resuming a streamed run with `latest` in the same folder,
every way of giving images (paths, bytes, `save_to_disk` PIL images, images inside the message parts), LoRA with
`--lora_modules_to_save` reloaded in a fresh process, and the command line / YAML precedence and errors."""

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from recipes.sft import build_trainer, main, parse_args
from recipes.sft_data import BadSampleError, SFTCollator
from recipes.sft_data.easy_vqa import write_easy_vqa_sft
from recipes.training.run_logs import SFT_TRAINING_LOG, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
IM_START, IM_END, ASSISTANT, NEWLINE = 151644, 151645, 77091, 198


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_easy_vqa_sft(folder, limit=8, turns=2, layout="messages")
    return folder


def _argv(output_dir, dataset, image_root, model, *extra):
    return ["--output_dir", str(output_dir), "--dataset_name", str(dataset), "--image_root", str(image_root),
            "--model_name_or_path", str(model), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--max_length", "256", "--bf16", "false", "--use_cpu", "true",
            "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--seed", "0",
            "--activation_checkpointing", "false", *[str(x) for x in extra]]


def _train(argv):
    script_args, training_args, model_args = parse_args(argv)
    trainer = build_trainer(script_args, training_args, model_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return trainer


def _user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def _reference_inputs(processor, row, image_root):
    """Model inputs and assistant-only labels built WITHOUT the kit's encoder/collator: the whole conversation
    rendered by the processor's chat template and expanded by the processor itself; labels are every token after
    each `<|im_start|>assistant\\n` up to and including its `<|im_end|>\\n`."""
    from PIL import Image

    text = processor.apply_chat_template(row["messages"], tokenize=False)
    images = [Image.open(Path(image_root) / path).convert("RGB") for path in row.get("images", [])]
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    labels, inside = [], False
    for i, token in enumerate(ids):
        if inside:
            labels.append(token)
            if token == NEWLINE and ids[i - 1] == IM_END:
                inside = False
            continue
        labels.append(-100)
        inside = i >= 2 and ids[i - 2:i + 1] == [IM_START, ASSISTANT, NEWLINE]
    inputs["labels"] = torch.tensor([labels])
    return inputs


def _summed_nll(model, inputs):
    """Summed next-token NLL over the supervised positions and their count (float64 reduction)."""
    labels = inputs["labels"][0, 1:]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**model_inputs, use_cache=False).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits.double(), labels, ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


# --- 0, 1 and 2 images, bad rows, gradient accumulation, epochs, evaluation ------------------------------------

GOOD_ROWS = [
    {"id": "two-images", "messages": [_user("Compare the two shapes.", images=2),
                                      {"role": "assistant", "content": "The first is a circle, the second a "
                                                                       "rectangle, and both are drawn in colour."}],
     "images": ["images/0.png", "images/1.png"]},
    {"id": "text-only", "messages": [{"role": "system", "content": "Be brief."}, _user("Say hi."),
                                     {"role": "assistant", "content": "hi"}]},
    {"id": "image-in-second-turn", "messages": [_user("Hello."), {"role": "assistant", "content": "Hello!"},
                                                _user("What shape is this?", images=1),
                                                {"role": "assistant", "content": "A triangle."}],
     "images": ["images/0.png"]},
]
BAD_ROWS = [
    {"id": "two-markers-one-image", "messages": [_user("Which is bigger?", images=2),
                                                 {"role": "assistant", "content": "The left one."}],
     "images": ["images/0.png"]},
    {"id": "empty-answer", "messages": [_user("Shape?", images=1), {"role": "assistant", "content": " "}],
     "images": ["images/1.png"]},
]


@pytest.fixture(scope="module")
def mixed(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    path = folder / "mixed.jsonl"
    rows = GOOD_ROWS[:2] + BAD_ROWS[:1] + GOOD_ROWS[2:] + BAD_ROWS[1:]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def accumulated_run(base_dir, data, mixed, tmp_path_factory):
    """One epoch (no --max_steps) of the 3 good rows at batch 1 x 3 accumulation steps = one optimizer step, with an
    evaluation on the same rows after it; bad rows skipped."""
    out = tmp_path_factory.mktemp("accumulated") / "run"
    argv = _argv(out, mixed, data, base_dir, "--max_steps", "-1", "--num_train_epochs", "1",
                 "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "3", "--skip_bad_samples",
                 "--eval_dataset_name", mixed, "--eval_strategy", "steps", "--eval_steps", "1",
                 "--per_device_eval_batch_size", "8", "--max_grad_norm", "1e9")
    return _train(argv), out


def test_bad_image_counts_and_empty_answers_stop_the_run_naming_the_sample(base_dir, data, mixed, tmp_path):
    with pytest.raises(BadSampleError, match=r"sample 'two-markers-one-image': 2 <image> marker\(s\) in the text "
                                             r"but 1 image\(s\) \[image_count_mismatch\]"):
        build_trainer(*parse_args(_argv(tmp_path / "out", mixed, data, base_dir)))
    only_empty = tmp_path / "empty.jsonl"
    only_empty.write_text(json.dumps(BAD_ROWS[1]) + "\n")
    with pytest.raises(BadSampleError, match=r"sample 'empty-answer': assistant turn \(message 1\) is empty"):
        build_trainer(*parse_args(_argv(tmp_path / "out2", only_empty, data, base_dir)))


def test_skipped_samples_are_counted_and_named_in_the_report(accumulated_run):
    trainer, out = accumulated_run
    assert trainer.train_dataset["sample_id"] == [r["id"] for r in GOOD_ROWS[:2]] + [GOOD_ROWS[2]["id"]]
    report = json.loads((out / "skipped_samples.json").read_text())
    assert report["counts"] == {"image_count_mismatch": 1, "empty_assistant_turn": 1}
    assert {e["sample_id"] for e in report["examples"]} == {"two-markers-one-image", "empty-answer"}


def test_skip_warnings_name_the_sample_and_count_each_split_on_its_own(base_dir, data, mixed, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="recipes.sft_data"):
        build_trainer(*parse_args(_argv(tmp_path / "out", mixed, data, base_dir, "--skip_bad_samples",
                                    "--eval_dataset_name", mixed)))
    messages = [r.getMessage() for r in caplog.records if r.name == "recipes.sft_data.errors"]
    assert any("'two-markers-one-image'" in m and "image_count_mismatch" in m for m in messages), messages
    assert any("'empty-answer'" in m and "empty_assistant_turn" in m for m in messages), messages
    totals = [r.getMessage() for r in caplog.records if r.name == "recipes.sft_data.loading"]
    # train and eval share the run's skip log; each split's summary counts its own 2 of 5 rows
    assert totals == ["skipped 2 bad sample(s) (empty_assistant_turn: 1, image_count_mismatch: 1) of 5"] * 2, totals


def test_gradient_accumulation_loss_and_gradient_are_token_weighted_over_the_step(accumulated_run, base_dir, data):
    """The logged loss and grad norm of the single optimizer step equal the summed NLL of all supervised tokens of the
    3 conversations (0, 2 and 1 images) divided by their total count, recomputed from the base model."""
    from transformers import AutoModelForImageTextToText

    trainer, _ = accumulated_run
    assert trainer.state.global_step == 1  # one epoch: 3 conversations / (1 x 3)
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(train_logs) == 1

    model = AutoModelForImageTextToText.from_pretrained(base_dir, trust_remote_code=True)
    model.model.vision_tower.requires_grad_(False)
    processor = trainer.processing_class
    total, count, per_sample = 0.0, 0, []
    for row in GOOD_ROWS:
        nll, n = _summed_nll(model, _reference_inputs(processor, row, data))
        total, count = total + nll, count + n
        per_sample.append(nll.item() / n)
    loss = total / count
    loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()
                                                      if p.grad is not None]))
    assert train_logs[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert abs(loss.item() - sum(per_sample) / 3) > 1e-3  # token weighting is distinguishable from a sample mean
    assert train_logs[0]["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)


def test_eval_loss_uses_the_training_masking(accumulated_run, data):
    """One evaluation batch: eval_loss is the token-weighted NLL of the (skipped-filtered) eval rows under the trained
    model, with the independent assistant-only labels."""
    trainer, _ = accumulated_run
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 1 and evals[0]["step"] == 1
    model = trainer.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in GOOD_ROWS:
            inputs = _reference_inputs(trainer.processing_class, row, data)
            nll, n = _summed_nll(model, inputs)
            total, count = total + nll.item(), count + n
            # the kit's collated row is the same sequence with the same labels
            kit = SFTCollator(trainer.processing_class)([trainer.eval_dataset[GOOD_ROWS.index(row)]])
            assert torch.equal(kit["input_ids"], inputs["input_ids"]) and torch.equal(kit["labels"], inputs["labels"])
    assert evals[0]["eval_loss"] == pytest.approx(total / count, rel=1e-5)


# --- resume --------------------------------------------------------------------------------------------------------

def test_resume_latest_of_a_streamed_run_in_the_same_folder(base_dir, data, tmp_path):
    """An interrupted streamed run (checkpoint at step 2, step 3 already logged) resumed with `latest`: step 3 is
    recomputed with the uninterrupted run's loss, and training_log.jsonl holds each step once."""
    common = ["--dataset_streaming", "--shuffle_dataset", "--max_steps", "3", "--save_strategy", "steps",
              "--save_steps", "2"]
    full = _train(_argv(tmp_path / "full", data / "train.jsonl", data, base_dir, *common))
    full_losses = [e["loss"] for e in full.state.log_history if "loss" in e]
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", interrupted / "checkpoint-2")
    records = read_jsonl(tmp_path / "full" / SFT_TRAINING_LOG)
    (interrupted / SFT_TRAINING_LOG).write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= 3
                                                        and "loss" in r))  # killed after logging step 3

    main(_argv(interrupted, data / "train.jsonl", data, base_dir, *common, "--resume_from_checkpoint", "latest"))
    steps = [(r["step"], r["loss"]) for r in read_jsonl(interrupted / SFT_TRAINING_LOG) if "loss" in r]
    assert [s for s, _ in steps] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([loss for _, loss in steps]), torch.tensor(full_losses), rtol=0,
                               atol=1e-5)
    assert (interrupted / "model.safetensors").exists()


def test_resume_latest_without_checkpoint_starts_fresh_and_a_wrong_path_fails_before_encoding(base_dir, data,
                                                                                             tmp_path):
    out = tmp_path / "fresh"
    out.mkdir()
    (out / SFT_TRAINING_LOG).write_text(json.dumps({"step": 9, "loss": 1.0}) + "\n")  # a stale earlier run
    script_args, training_args, model_args = parse_args(_argv(out, data / "train.jsonl", data, base_dir,
                                                          "--resume_from_checkpoint", "latest"))
    build_trainer(script_args, training_args, model_args)
    assert training_args.resume_from_checkpoint is None and not (out / SFT_TRAINING_LOG).exists()

    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ValueError, match="no-such-checkpoint: not a Trainer checkpoint folder"):
        build_trainer(*parse_args(_argv(tmp_path / "x", tmp_path / "no-data.jsonl", data, base_dir,
                                    "--resume_from_checkpoint", missing)))


# --- ways of giving images -----------------------------------------------------------------------------------------

def test_paths_bytes_pil_and_inline_images_give_identical_batches(base_dir, data, tmp_path):
    import datasets
    from PIL import Image

    rows = [{**r, "messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]
                                if isinstance(m["content"], str) else m["content"]} for m in r["messages"]]}
            for r in (GOOD_ROWS[0], GOOD_ROWS[2])]  # Arrow columns cannot mix string and list contents
    paths = tmp_path / "paths.jsonl"
    paths.write_text("".join(json.dumps(r) + "\n" for r in rows))
    absolute = [[str(data / p) for p in r["images"]] for r in rows]
    pil = datasets.Dataset.from_dict({"id": [r["id"] for r in rows], "messages": [r["messages"] for r in rows],
                                      "images": [[Image.open(p).copy() for p in ps] for ps in absolute]})  # in memory
    pil.to_parquet(str(tmp_path / "bytes.parquet"))  # images embedded as PNG bytes
    pil.save_to_disk(str(tmp_path / "saved"))  # a `save_to_disk` folder, which `load_dataset` refuses
    datasets.DatasetDict({"train": pil}).save_to_disk(str(tmp_path / "saved_dict"))
    inline = tmp_path / "inline.jsonl"  # transformers' convention: the image in its part, no `images` column
    with inline.open("w") as handle:
        for row, images in zip(rows, absolute):
            queue = iter(images)
            messages = [{"role": m["role"], "content": [
                {"type": "image", "image": next(queue)} if p["type"] == "image" else p for p in m["content"]]}
                for m in row["messages"]]
            handle.write(json.dumps({"id": row["id"], "messages": messages}) + "\n")

    batches = {}
    for name, source in [("paths", paths), ("bytes", tmp_path / "bytes.parquet"), ("saved", tmp_path / "saved"),
                         ("saved_dict", tmp_path / "saved_dict"), ("inline", inline)]:
        trainer = build_trainer(*parse_args(_argv(tmp_path / name / "out", source, data, base_dir)))
        assert trainer.train_dataset["sample_id"] == [r["id"] for r in rows], name
        batches[name] = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    reference = batches.pop("paths")
    assert reference["pixel_values"].shape[0] == 3
    for name, batch in batches.items():
        assert batch.keys() == reference.keys(), name
        for key in reference:
            assert torch.equal(batch[key], reference[key]), (name, key)


# --- LoRA with modules_to_save -------------------------------------------------------------------------------------

def test_lora_modules_to_save_merged_folder_generates_like_the_adapter_in_a_fresh_process(base_dir, data, tmp_path):
    out = tmp_path / "lora"
    main(_argv(out, data / "train.jsonl", data, base_dir, "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
               "--lora_modules_to_save", "multi_modal_projector", "lm_head", "--max_steps", "1",
               "--learning_rate", "1e-2"))
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # lm_head is tied to the input embeddings: peft (ensure_weight_tying) trains the shared matrix as embed_tokens
    assert adapter_config["ensure_weight_tying"] is True
    assert adapter_config["modules_to_save"] == ["multi_modal_projector", "model.language_model.embed_tokens"]
    script = textwrap.dedent("""
        import json, sys, torch
        from PIL import Image
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText, AutoProcessor
        out, base, image = sys.argv[1:4]
        processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
        merged = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
        adapter = PeftModel.from_pretrained(
            AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True), f"{out}/adapter").eval()
        base_model = AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True).eval()
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": "Shape?"}]}], add_generation_prompt=True,
                                               tokenize=False)
        inputs = processor(text=prompt, images=[Image.open(image)], return_tensors="pt")
        with torch.no_grad():
            logits = {n: m(**inputs, use_cache=False).logits for n, m in
                      [("merged", merged), ("adapter", adapter), ("base", base_model)]}
            tokens = {n: m.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist()
                      for n, m in [("merged", merged), ("adapter", adapter)]}
        print(json.dumps({
            "merged_vs_adapter": (logits["merged"] - logits["adapter"]).abs().max().item(),
            "adapter_vs_base": (logits["adapter"] - logits["base"]).abs().max().item(),
            "same_tokens": tokens["merged"] == tokens["adapter"],
            "new_tokens": len(tokens["merged"]) - inputs["input_ids"].shape[1],
            "lm_head_trained": not torch.equal(merged.lm_head.weight, base_model.lm_head.weight),
            "still_tied": torch.equal(merged.get_input_embeddings().weight, merged.lm_head.weight),
            "tie_in_config": merged.config.tie_word_embeddings}))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(out), str(base_dir), str(data / "images" / "0.png")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["merged_vs_adapter"] < 1e-4 and facts["adapter_vs_base"] > 1e-3, facts
    assert facts["same_tokens"] and facts["new_tokens"] == 6, facts
    # the base ties its LM head to the input embeddings: training lm_head trains the one shared matrix (as full
    # fine-tuning would) and the merged folder keeps it shared
    assert facts["lm_head_trained"] and facts["still_tied"] and facts["tie_in_config"], facts


# --- configuration -------------------------------------------------------------------------------------------------

def test_command_line_overrides_the_yaml_and_unknown_keys_fail_before_training(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text((ROOT / "recipes" / "configs" / "sft_tiny.yaml").read_text() + "lora_r: 3\n")
    script_args, training_args, model_args = parse_args(["--config", str(config), "--learning_rate", "0.25",
                                                     "--chat_format", "compat", "--output_dir", str(tmp_path / "o")])
    assert (training_args.learning_rate, script_args.chat_format, training_args.max_steps, model_args.lora_r,
            script_args.num_image_tokens) == (0.25, "compat", 4, 3, 16)

    config.write_text(config.read_text() + "lerning_rate: 0.1\n")
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"Unknown arguments from config file: \['--lerning_rate', '0.1'\]"):
        main(["--config", str(config), "--output_dir", str(out)])
    config.write_text((ROOT / "recipes" / "configs" / "sft_tiny.yaml").read_text())
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--no_such_option', '3'\]"):
        main(["--config", str(config), "--output_dir", str(out), "--no_such_option", "3"])
    assert not out.exists()


def test_streaming_without_max_steps_is_refused(base_dir, data, tmp_path):
    with pytest.raises(ValueError, match="--dataset_streaming needs --max_steps"):
        build_trainer(*parse_args(_argv(tmp_path / "o", data / "train.jsonl", data, base_dir, "--dataset_streaming",
                                    "--max_steps", "-1")))
