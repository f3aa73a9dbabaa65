"""recipes/sft.py end to end on CPU: 2-step runs per data layout, 144->729-style token change, fresh-process reload,
LoRA adapter reload and merge, bad samples, resume from a Trainer checkpoint."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes.sft import build_trainer, parse_args, save_outputs
from recipes.sft_data import BadSampleError
from recipes.sft_data.easy_vqa import write_easy_vqa_sft

IMG = 151655
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """easy-vqa written in every layout: messages JSONL, LLaVA JSON, MAmmoTH JSON and the MAmmoTH split."""
    folder = tmp_path_factory.mktemp("data")
    messages = write_easy_vqa_sft(folder, limit=8, turns=2, layout="messages")
    llava = write_easy_vqa_sft(folder, limit=8, turns=2, layout="llava")
    rows = json.loads(llava.read_text())
    rows.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."},
                                                      {"from": "gpt", "value": "hi"}]})
    llava.write_text(json.dumps(rows))
    mammoth = folder / "mammoth_si.json"
    mammoth.write_text(json.dumps([{**r, "source": "easy_vqa"} for r in rows]))
    split = folder / "instruction_si_split"
    split.mkdir()
    with open(folder / "mammoth_si_simple.jsonl", "w") as index:
        for r in rows:
            name = r["id"].replace("-", "_") + ".json"
            (split / name).write_text(json.dumps({**r, "source": "easy_vqa"}))
            index.write(json.dumps({"path": name, "length": 729}) + "\n")
    return {"folder": folder, "messages": messages, "llava": llava, "mammoth": mammoth,
            "mammoth_split": folder / "mammoth_si_simple.jsonl", "split_dir": split}


def _argv(output_dir, dataset, image_root, *extra, model=None):
    argv = ["--output_dir", str(output_dir), "--dataset_name", str(dataset), "--image_root", str(image_root),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--max_length", "256", "--bf16", "false", "--use_cpu", "true", "--report_to", "none",
            "--save_strategy", "no", "--logging_steps", "1", "--seed", "0", "--activation_checkpointing", "false"]
    if model is not None:
        argv += ["--model_name_or_path", str(model)]
    return argv + [str(x) for x in extra]


def _train(argv):
    script_args, training_args, model_args = parse_args(argv)
    trainer = build_trainer(script_args, training_args, model_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return trainer, script_args, model_args


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("layout, extra", [
    ("llava", ["--train_vision"]),
    ("mammoth", ["--chat_format", "compat"]),
    ("mammoth_split", ["--dataset_format", "mammoth_split"]),
    ("messages", ["--packing"]),
    ("messages-streaming", ["--dataset_streaming", "--packing", "--shuffle_dataset"]),
])
def test_two_step_run_for_each_layout(layout, extra, base_dir, data, tmp_path):
    if layout == "mammoth_split":
        extra = extra + ["--sample_dir", data["split_dir"]]
    trainer, script_args, model_args = _train(_argv(tmp_path / "out", data[layout.split("-")[0]], data["folder"],
                                                    *extra, model=base_dir))
    losses = _losses(trainer)
    if layout.startswith("messages"):  # packed: rows are packs of conversations, collated into one isolated row
        first = next(iter(trainer.train_dataset))
        assert isinstance(first["sample_id"], list) and len(first["sample_id"]) > 1
        assert "position_ids" in next(iter(trainer.get_train_dataloader()))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    out = save_outputs(trainer, script_args, model_args)
    before, after = _weights(base_dir), _weights(out)
    vision = [k for k in before if ".vision_tower." in k]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".language_model." in k for k in changed) and any(".multi_modal_projector." in k for k in changed)
    assert bool(changed & set(vision)) == (layout == "llava")  # the tower trains only with --train_vision
    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["num_image_tokens"] == 16
    template = (out / "chat_template.jinja").read_text()
    assert ("You are a helpful assistant" in template) and (("'<s>" in template) == (layout == "mammoth"))


def test_more_visual_tokens_is_a_config_change_and_the_folder_reloads_in_a_fresh_process(base_dir, data, tmp_path):
    trainer, script_args, model_args = _train(_argv(tmp_path / "out", data["messages"], data["folder"],
                                                    "--num_image_tokens", "64", model=base_dir))
    out = save_outputs(trainer, script_args, model_args)
    config = json.loads((out / "config.json").read_text())
    assert config["num_image_tokens"] == 64 and config["auto_map"]["AutoModelForImageTextToText"]
    before, after = _weights(base_dir), _weights(out)
    assert set(before) == set(after)  # same weights, more tokens
    assert all(torch.equal(before[k], after[k]) for k in before if ".vision_tower." in k)  # frozen by default

    processor = trainer.processing_class
    image = data["folder"] / "images" / "0.png"
    from PIL import Image

    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": "Shape?"}]}],
                                           add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=[Image.open(image)], return_tensors="pt")
    assert int((inputs["input_ids"] == IMG).sum()) == 64
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent("""
        import sys, torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        out, image, expected = sys.argv[1:4]
        model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert processor.num_image_tokens == 64
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": "Shape?"}]}], add_generation_prompt=True,
                                               tokenize=False)
        inputs = processor(text=prompt, images=[Image.open(image)], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
        torch.testing.assert_close(logits, torch.load(expected, weights_only=True), rtol=0, atol=1e-5)
        print("reloaded", type(model).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(out), str(image), str(tmp_path / "expected.pt")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reloaded OpenQwen2VLForConditionalGeneration" in result.stdout


def test_lora_on_the_language_model_reloads_and_merges(base_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    argv = _argv(tmp_path / "out", data["llava"], data["folder"], "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
                 "--activation_checkpointing", "true", model=base_dir)
    trainer, script_args, model_args = _train(argv)
    names = [n for n, _ in trainer.model.named_modules() if n.endswith("lora_A")]
    assert len(names) == 2 * 7 and all(".language_model.layers." in n for n in names)  # 2 layers x 7 linears
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    model = trainer.model.eval()
    with torch.no_grad():
        trained = model(**batch, use_cache=False).logits
    out = save_outputs(trainer, script_args, model_args)
    adapter = out / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert "language_model" in adapter_config["target_modules"]
    assert adapter_config["modules_to_save"] == ["multi_modal_projector"]
    assert not (out / "adapter_config.json").exists()

    fresh = AutoModelForImageTextToText.from_pretrained(base_dir, trust_remote_code=True)
    reloaded = PeftModel.from_pretrained(fresh, adapter).eval()
    merged = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch, use_cache=False).logits, trained, rtol=0, atol=0)
        torch.testing.assert_close(merged(**batch, use_cache=False).logits, trained, rtol=0, atol=1e-4)
    base_weights, merged_weights = _weights(base_dir), _weights(out)
    assert all(torch.equal(base_weights[k], merged_weights[k]) for k in base_weights if ".vision_tower." in k)


def test_bad_samples_stop_the_run_or_are_counted(base_dir, data, tmp_path):
    rows = json.loads(data["llava"].read_text())
    rows.append({"id": "ghost", "image": "images/ghost.png", "conversations": rows[0]["conversations"]})
    rows.append({"id": "huge", "conversations": [{"from": "human", "value": "word " * 400},
                                                 {"from": "gpt", "value": "ok"}]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    with pytest.raises(BadSampleError, match=r"sample 'ghost': image file .*ghost.png does not exist"):
        _train(_argv(tmp_path / "a", bad, data["folder"], model=base_dir))
    trainer, *_ = _train(_argv(tmp_path / "b", bad, data["folder"], "--skip_bad_samples", model=base_dir))
    report = json.loads((tmp_path / "b" / "skipped_samples.json").read_text())
    assert report["counts"] == {"missing_image": 1, "too_long": 1}
    assert len(trainer.train_dataset) == len(rows) - 2


def test_skips_in_dataloader_workers_are_counted_in_the_report(base_dir, data, tmp_path):
    rows = json.loads(data["llava"].read_text())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"exists, but is no image")  # found only by the collator, inside the worker process
    rows.append({"id": "broken", "image": str(broken), "conversations": rows[0]["conversations"]})
    rows.append({"id": "ghost", "image": "images/ghost.png", "conversations": rows[0]["conversations"]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    stale = tmp_path / "run" / "skipped_samples.parts"
    stale.mkdir(parents=True)
    (stale / "old-run.jsonl").write_text(json.dumps({"sample_id": "x", "kind": "stale", "detail": "", "stage": "e"}))
    _train(_argv(tmp_path / "run", bad, data["folder"], "--skip_bad_samples", "--dataloader_num_workers", "1",
                 "--max_steps", "6", "--per_device_train_batch_size", "2", model=base_dir))  # 6 x 2 rows: one epoch
    report = json.loads((tmp_path / "run" / "skipped_samples.json").read_text())
    assert report["counts"] == {"missing_image": 1, "unreadable_image": 1}
    assert {e["sample_id"]: e["stage"] for e in report["examples"]} == {"ghost": "encode", "broken": "collate"}


def test_a_first_batch_of_only_unreadable_images_is_a_step_without_loss(base_dir, data, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"exists, but is no image")
    conversation = json.loads(data["llava"].read_text())[0]["conversations"]
    bad = tmp_path / "bad.json"  # every row is bad: each batch is its worker's first, with nothing to fall back on
    bad.write_text(json.dumps([{"id": f"broken{i}", "image": str(broken), "conversations": conversation}
                               for i in range(2)]))
    for layout in ([], ["--packing"]):
        run = tmp_path / f"run{len(layout)}"
        trainer, *_ = _train(_argv(run, bad, data["folder"], "--skip_bad_samples", *layout, model=base_dir))
        assert _losses(trainer) == [0.0, 0.0]
        assert [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e] == [0.0, 0.0]
        report = json.loads((run / "skipped_samples.json").read_text())
        assert report["counts"] == {"unreadable_image": 2}


def test_eval_data_with_several_splits_gives_its_test_split(base_dir, tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    for split in ("train", "test"):
        rows = [{"id": f"{split}-{i}", "messages": [{"role": "user", "content": "Q?"},
                                                   {"role": "assistant", "content": f"{split} answer"}]}
                for i in range(3)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script_args, training_args, model_args = parse_args(_argv(tmp_path / "out", folder, folder, "--eval_dataset_name",
                                                          folder, model=base_dir))
    trainer = build_trainer(script_args, training_args, model_args)
    assert trainer.train_dataset["sample_id"] == ["train-0", "train-1", "train-2"]
    assert trainer.eval_dataset["sample_id"] == ["test-0", "test-1", "test-2"]


@pytest.mark.slow
def test_tiny_config_runs_from_the_command_line(tmp_path):
    """The shipped tiny YAML (random tiny model, easy-vqa written on the fly) through the script entry point."""
    result = subprocess.run(
        [sys.executable, "recipes/sft.py", "--config", "recipes/configs/sft_tiny.yaml", "--output_dir",
         str(tmp_path / "tiny"), "--max_steps", "2", "--easy_vqa_limit", "8"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Updated tokens" not in result.stderr  # Trainer found the config's BOS/EOS/PAD ids equal to the processor's
    assert (tmp_path / "tiny" / "model.safetensors").exists()
    assert (tmp_path / "tiny" / "easy_vqa_data" / "train.jsonl").exists()


@pytest.mark.slow
def test_resume_from_a_trainer_checkpoint_reproduces_the_losses(base_dir, data, tmp_path):
    common = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    full, *_ = _train(_argv(tmp_path / "full", data["messages"], data["folder"], *common, model=base_dir))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed, *_ = _train(_argv(resumed_dir, data["messages"], data["folder"], *common, "--resume_from_checkpoint",
                               resumed_dir / "checkpoint-2", model=base_dir))
    assert resumed.state.global_step == 4
    torch.testing.assert_close(torch.tensor(_losses(resumed)[-2:]), torch.tensor(_losses(full)[-2:]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["sft_llava665k", "sft_mammoth"])
def test_paper_configs_hold_the_paper_hyperparameters(name):
    script_args, training_args, model_args = parse_args(["--config", str(ROOT / "recipes" / "configs" / f"{name}.yaml"),
                                                     "--bf16", "false"])  # bf16 needs a GPU to parse
    assert (training_args.learning_rate, training_args.weight_decay, training_args.warmup_steps) == (2e-5, 0.1, 0.03)
    assert training_args.lr_scheduler_type == "cosine" and training_args.max_length == 4096
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * 8 == 128
    assert script_args.num_image_tokens == 729 and not script_args.train_vision and not model_args.use_peft


def test_lora_pattern_cannot_match_the_vision_tower(tiny_model):
    import re

    from recipes.sft_model import language_model_lora_pattern

    for targets in (None, "all-linear", ["all-linear"], ["q_proj", "v_proj"]):
        pattern = language_model_lora_pattern(targets)
        matched = [n for n, _ in tiny_model.named_modules() if re.fullmatch(pattern, n)]
        expected = 2 * (7 if targets in (None, "all-linear", ["all-linear"]) else 2)
        assert len(matched) == expected and all(n.startswith("model.language_model.layers.") for n in matched)
    vision = [n for n, _ in tiny_model.named_modules() if n.endswith("q_proj") and "vision_tower" in n]
    assert vision  # the tower does have q_proj modules that a plain list would have hit
