"""SFT options and inputs that used to be ignored or lost silently: each is now applied or refused with a clear error.

* LoRA: ``--lora_modules_to_save`` adds to the modules that must train fully (projector; tower with
  ``--train_vision``), counted parameter by parameter against the model's own modules;
* ``messages`` content: the part types of transformers' chat format (``text``, ``image`` with
  image/path/url/base64, OpenAI's ``image_url``) are read, any other part or content (null, a number, plain strings)
  is a ``bad_content`` error naming the sample, counted under ``--skip_bad_samples``;
* TRL / ModelConfig options: ``--model_revision`` loads that revision (a local HF cache with two revisions),
  ``--completion_only_loss false`` supervises all text (checked against the processor's own encoding),
  ``--eval_packing`` packs (or not) the eval split on its own, and ``packing_strategy``, ``lora_task_type``,
  ``lora_target_parameters`` values the kit cannot apply are refused;
* content that vanished silently: system turns dropped by ``--chat_format compat`` are counted and logged once with
  the fix, message fields the templates do not render (``tool_calls``...) are named, unmarked images TRL cannot
  place are named (not a bare ValueError), and a file mixing ``image`` and ``images`` columns reads both.
"""

import base64
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from recipes.sft_data import (
    BadSampleError,
    SFTCollator,
    SFTEncoder,
    SFTSample,
    SkipLog,
    encode_sft_dataset,
    load_raw_sft_dataset,
    to_sft_sample,
)
from recipes.sft_data.easy_vqa import write_easy_vqa_sft
from recipes.sft_model import build_lora_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.sft_runs import build, sft_argv  # noqa: E402

IMG = 151655
IGNORE = -100
_build = build


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_easy_vqa_sft(folder, limit=6, turns=2, layout="messages")
    return folder


def _argv(output_dir, data, model, *extra):
    return sft_argv(output_dir, data / "train.jsonl", data, "--max_steps", 1, "--per_device_train_batch_size", 2,
                    "--max_length", 256, "--save_strategy", "no", *extra, model=model)


# --- 1. LoRA: --lora_modules_to_save adds to the modules that must train -------------------------------------------

def _module_sizes(model) -> dict[str, int]:
    """Sizes of the modules; the tower counts only what a backward through the image features reaches (its layers
    past the feature layer never run, so they cannot train)."""
    inner = model.model
    torch.cat(inner.get_image_features(torch.randn(1, 3, 64, 64)).pooler_output).sum().backward()
    return {"projector": sum(p.numel() for p in inner.multi_modal_projector.parameters()),
            "tower": sum(p.numel() for p in inner.vision_tower.parameters() if p.grad is not None),
            "embeddings": inner.language_model.embed_tokens.weight.numel()}


def _trainable(model) -> dict[str, int]:
    """Trainable parameters per module of a peft-wrapped model (LoRA matrices counted apart)."""
    counts = {"projector": 0, "tower": 0, "embeddings": 0, "lora": 0, "other": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = ("lora" if ".lora_" in name else "projector" if ".multi_modal_projector." in name
                else "tower" if ".vision_tower." in name else "embeddings" if ".embed_tokens." in name else "other")
        counts[part] += param.numel()
    return counts


@pytest.mark.parametrize("train_vision", [False, True])
def test_lora_modules_to_save_adds_to_the_projector_and_tower_instead_of_replacing_them(base_dir, data, tmp_path,
                                                                                        train_vision, caplog):
    from transformers import AutoModelForImageTextToText

    sizes = _module_sizes(AutoModelForImageTextToText.from_pretrained(base_dir))
    extra = ["--use_peft", "--lora_r", "4", "--lora_modules_to_save", "lm_head"]
    extra += ["--train_vision"] if train_vision else []
    with caplog.at_level(logging.INFO, logger="recipes.sft_model"):
        trainer = _build(*_argv(tmp_path / "out", data, base_dir, *extra))
    counts = _trainable(trainer.model)
    assert counts["projector"] == sizes["projector"] > 0
    assert counts["tower"] == (sizes["tower"] if train_vision else 0)
    # lm_head is tied to the input embeddings: the one shared matrix trains (peft's ensure_weight_tying)
    assert counts["embeddings"] == sizes["embeddings"] and counts["lora"] > 0 and counts["other"] == 0, counts
    added = ["multi_modal_projector"] + (["vision_tower"] if train_vision else [])
    assert any(f"also training {added} fully" in r.getMessage() for r in caplog.records), caplog.text


def test_train_vision_trains_exactly_the_tower_parameters_that_get_a_gradient(base_dir, data, tmp_path):
    from transformers import AutoModelForImageTextToText

    reference = AutoModelForImageTextToText.from_pretrained(base_dir)
    torch.cat(reference.model.get_image_features(torch.randn(1, 3, 64, 64)).pooler_output).sum().backward()
    reached = {name for name, p in reference.model.vision_tower.named_parameters() if p.grad is not None}
    trainer = _build(*_argv(tmp_path / "out", data, base_dir, "--train_vision"))
    trainable = {name for name, p in trainer.model.model.vision_tower.named_parameters() if p.requires_grad}
    assert trainable == reached and len(reached) < len(list(reference.model.vision_tower.parameters()))


def test_modules_to_save_already_naming_the_projector_are_not_doubled():
    config = build_lora_config(modules_to_save=["model.multi_modal_projector", "lm_head"], train_vision=True)
    assert sorted(config.modules_to_save) == ["lm_head", "model.multi_modal_projector", "vision_tower"]
    assert sorted(build_lora_config(modules_to_save="lm_head").modules_to_save) == ["lm_head", "multi_modal_projector"]
    assert build_lora_config().modules_to_save == ["multi_modal_projector"]


# --- 2. content parts: transformers' chat format is read, anything else is named -----------------------------------

def _messages(user_content, answer="A circle."):
    return [{"role": "user", "content": user_content}, {"role": "assistant", "content": answer}]


def _encode(processor, row, image_root=None):
    sample = to_sft_sample(row, "messages", image_root=image_root)
    encoded = SFTEncoder(processor, "chatml").encode(sample)
    batch = SFTCollator(processor)([{"sample_id": encoded.sample_id, "input_ids": encoded.input_ids,
                                     "labels": encoded.labels, "images": encoded.images}])
    return sample, batch


def test_openai_image_url_and_every_image_payload_give_the_batch_of_an_images_column(processor, data):
    image = sorted((data / "images").glob("*.png"))[0]
    png = base64.b64encode(image.read_bytes()).decode()
    question = {"type": "text", "text": "What shape?"}
    _, expected = _encode(processor, {"id": "ref", "messages": _messages([{"type": "image"}, question]),
                                      "images": [str(image)]})
    assert int((expected["input_ids"] == IMG).sum()) == 16
    parts = {
        "image_url path": {"type": "image_url", "image_url": {"url": str(image)}},
        "image_url file URL": {"type": "image_url", "image_url": {"url": f"file://{image}"}},
        "image_url data URI": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        "image_url string": {"type": "image_url", "image_url": str(image)},
        "image url relative": {"type": "image", "url": f"images/{image.name}"},
        "image base64": {"type": "image", "base64": png},
        "image path": {"type": "image", "path": str(image)},
    }
    for name, part in parts.items():
        sample, batch = _encode(processor, {"id": name, "messages": _messages([part, question])}, image_root=str(data))
        assert len(sample.images) == 1, name
        for key in ("input_ids", "labels", "pixel_values"):
            assert torch.equal(batch[key], expected[key]), (name, key)


def test_images_both_in_the_column_and_inside_message_parts_are_a_named_conflict(data):
    image = str(sorted((data / "images").glob("*.png"))[0])
    question = {"type": "text", "text": "What shape?"}
    row = {"id": "both", "messages": _messages([{"type": "image", "path": image}, question]), "images": [image]}
    with pytest.raises(BadSampleError, match=r"sample 'both': the row has 1 image\(s\) in its `images` column and 1 "
                                             r"inside its message parts") as info:
        to_sft_sample(row, "messages")
    assert info.value.kind == "conflicting_images"
    # payload-free parts (TRL's layout, or datasets' null-filled part keys) next to the column are no conflict
    row["messages"] = _messages([{"type": "image", "image": None, "path": None}, question])
    assert len(to_sft_sample(row, "messages").images) == 1


@pytest.mark.parametrize("part, shown", [
    ({"type": "input_text", "text": "What shape?"}, "part 1 has type 'input_text'"),
    ({"text": "What shape?"}, "part 1 has type None"),
    ({"type": "video", "video": "clip.mp4"}, "part 1 has type 'video'"),
    ("What shape?", "part 1 is a str ('What shape?')"),
    ({"type": "text", "text": None}, "text part 1 has no text string"),
    ({"type": "image_url", "image_url": {"detail": "low"}}, "image_url part 1 has no url"),
])
def test_a_part_the_template_would_drop_is_a_bad_content_error_naming_the_sample(part, shown):
    row = {"id": "odd-part", "messages": _messages([{"type": "image", "path": "x.png"}, part])}
    with pytest.raises(BadSampleError, match=re.escape(f"sample 'odd-part': message 0 (user): {shown}")) as info:
        to_sft_sample(row, "messages", check_files=False)
    assert info.value.kind == "bad_content"


@pytest.mark.parametrize("url, kind, detail", [
    ("https://example.com/cat.png", "remote_image", r"image https://example.com/cat.png is a web address"),
    ("data:image/png,rawbytes", "bad_image", r"data URI .* is not base64-encoded"),
    ("data:image/png;base64,@@@", "bad_image", r"image data is not valid base64"),
])
def test_an_image_url_that_cannot_be_read_offline_is_named(url, kind, detail):
    row = {"id": "web", "messages": _messages([{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "Q"}])}
    with pytest.raises(BadSampleError, match=rf"sample 'web': {detail}") as info:
        to_sft_sample(row, "messages")
    assert info.value.kind == kind


# --- 3. null / non-string content: named, counted under --skip_bad_samples -----------------------------------------

@pytest.mark.parametrize("row, detail", [
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "ok"}]},
     r"message 0 \(user\): content is null"),
    ({"messages": [{"role": "system", "content": None}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "ok"}]}, r"message 0 \(system\): content is null"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "ok"}]},
     r"message 0 \(user\): content is a int \(3\)"),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "ok"}]},
     r"message 0 \(user\): part 0 is a str \('hi'\)"),
    ({"messages": ["hello", {"role": "assistant", "content": "ok"}]}, r"message 0 is a str \('hello'\)"),
    ({"messages": "hello"}, r"`messages` is a str"),
])
def test_messages_content_the_template_cannot_render_is_named(row, detail, processor):
    with pytest.raises(BadSampleError, match=rf"sample 'bad': {detail}") as info:
        to_sft_sample({"id": "bad", **row}, "messages")
    assert info.value.kind == "bad_content"


@pytest.mark.parametrize("value, detail", [(3, r"value is a int \(3\)"), (None, "value is null")])
def test_llava_turn_value_that_is_not_a_string_is_named(value, detail):
    row = {"id": "bad", "conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": value}]}
    with pytest.raises(BadSampleError, match=rf"sample 'bad': turn 1 \(gpt\): {detail}") as info:
        to_sft_sample(row, "llava")
    assert info.value.kind == "bad_content"


def test_the_encoder_names_a_sample_whose_messages_the_template_cannot_render(processor):
    sample = SFTSample("built-by-hand", [{"role": "user", "content": 3}, {"role": "assistant", "content": "ok"}])
    with pytest.raises(BadSampleError, match=r"sample 'built-by-hand': the chat template cannot render") as info:
        SFTEncoder(processor, "chatml").encode(sample)
    assert info.value.kind == "bad_content"


def test_null_content_rows_loaded_by_datasets_stop_the_run_or_are_counted(processor, tmp_path):
    rows = [{"id": "good", "messages": _messages("hi", "ok")},
            {"id": "null-user", "messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "ok"}]},
            {"id": "null-text", "messages": [{"role": "user", "content": [{"type": "text", "text": None}]},
                                             {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}]
    raw = {}
    for name, subset in {"strings": rows[:2], "parts": rows[2:]}.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in subset))
        raw[name] = load_raw_sft_dataset(str(path))
    encoder = SFTEncoder(processor, "chatml", max_length=256)
    with pytest.raises(BadSampleError, match=r"sample 'null-user': message 0 \(user\): content is null"):
        encode_sft_dataset(raw["strings"], encoder)
    log = SkipLog()
    kept = encode_sft_dataset(raw["strings"], encoder, skip_bad_samples=True, skip_log=log)
    kept_parts = encode_sft_dataset(raw["parts"], encoder, skip_bad_samples=True, skip_log=log)
    assert kept["sample_id"] == ["good"] and len(kept_parts) == 0
    assert dict(log.counts) == {"bad_content": 2}
    assert {e["sample_id"] for e in log.examples} == {"null-user", "null-text"}


# --- 4. TRL / ModelConfig options: applied or refused ------------------------------------------------------------

@pytest.fixture()
def hub_cache(monkeypatch, tmp_path):
    """A local HF hub cache holding `kit/tiny` at two revisions (different weights and image_mean), read offline."""
    import huggingface_hub.constants

    from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration, build_processor

    repo = tmp_path / "hub" / "models--kit--tiny"
    for revision, commit, seed, mean in (("main", "a" * 40, 0, 0.5), ("v1", "b" * 40, 1, 0.25)):
        config = OpenQwen2VLConfig.tiny(num_image_tokens=16)
        torch.manual_seed(seed)
        OpenQwen2VLForConditionalGeneration(config).save_pretrained(repo / "snapshots" / commit)
        processor = build_processor(config)
        processor.image_processor.image_mean = [mean] * 3
        processor.save_pretrained(repo / "snapshots" / commit)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo


def test_model_revision_loads_that_revision_of_model_and_processor(hub_cache, base_dir, data, tmp_path):
    from transformers import AutoModelForImageTextToText

    expected = {rev: AutoModelForImageTextToText.from_pretrained(hub_cache / "snapshots" / commit).state_dict()
                for rev, commit in (("main", "a" * 40), ("v1", "b" * 40))}
    for revision, mean in (("v1", 0.25), ("main", 0.5)):
        trainer = _build(*_argv(tmp_path / revision, data, "kit/tiny", "--model_revision", revision))
        weights = trainer.model.state_dict()
        assert all(torch.equal(weights[k], v) for k, v in expected[revision].items()), revision
        assert list(trainer.processing_class.image_processor.image_mean) == [mean] * 3
    with pytest.raises(ValueError, match=r"model_revision='v1' selects a version of a hub model, but .* is not one "
                                         r"\(a local folder has no revisions\)"):
        _build(*_argv(tmp_path / "local", data, base_dir, "--model_revision", "v1"))


def _reference_ids(processor, row, image_root):
    """The conversation encoded by the processor itself (whole template rendering, images expanded)."""
    text = processor.apply_chat_template(row["messages"], tokenize=False)
    images = [Image.open(Path(image_root) / path).convert("RGB") for path in row["images"]]
    return processor(text=text, images=images, return_tensors="pt")["input_ids"][0]


@pytest.mark.parametrize("extra, whole", [([], False), (["--completion_only_loss", "true"], False),
                                          (["--assistant_only_loss", "true"], False),
                                          (["--completion_only_loss", "false"], True)])
def test_completion_only_loss_false_supervises_all_text_and_no_image_token(base_dir, data, tmp_path, extra, whole):
    trainer = _build(*_argv(tmp_path / "out", data, base_dir, *extra))
    rows = {json.loads(line)["id"]: json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()}
    processor = trainer.processing_class
    for encoded in trainer.train_dataset:
        batch = trainer.data_collator([encoded])
        ids = _reference_ids(processor, rows[encoded["sample_id"]], data)
        assert torch.equal(batch["input_ids"][0], ids)
        labels = batch["labels"][0]
        if whole:
            assert torch.equal(labels, torch.where(ids == IMG, IGNORE, ids))
        else:  # assistant turns only: a strict subset of the text, starting after the first `assistant\n`
            supervised, text = labels != IGNORE, ids != IMG
            assert not supervised[~text].any() and 0 < int(supervised.sum()) < int(text.sum())
            assert processor.tokenizer.decode(labels[labels != IGNORE]).endswith("<|im_end|>\n")


def test_completion_only_loss_false_with_assistant_only_loss_is_refused(base_dir, data, tmp_path):
    with pytest.raises(ValueError, match=r"completion_only_loss=false .* contradicts assistant_only_loss=true"):
        _build(*_argv(tmp_path / "out", data, base_dir, "--completion_only_loss", "false",
                      "--assistant_only_loss", "true"))


@pytest.mark.parametrize("packing, eval_packing", [("false", "true"), ("true", "false")])
def test_eval_packing_packs_the_eval_split_on_its_own_with_the_same_eval_loss(base_dir, data, tmp_path, packing,
                                                                              eval_packing):
    common = ["--eval_dataset_name", data / "train.jsonl", "--per_device_eval_batch_size", "16"]
    trainer = _build(*_argv(tmp_path / "a", data, base_dir, *common, "--packing", packing,
                            "--eval_packing", eval_packing))
    train_batch = next(iter(trainer.get_train_dataloader()))
    eval_batch = next(iter(trainer.get_eval_dataloader()))
    assert ("position_ids" in train_batch) == (packing == "true")
    assert ("position_ids" in eval_batch) == (eval_packing == "true")
    assert ("attention_mask" in eval_batch) == (eval_packing == "false")
    supervised = int((eval_batch["labels"] != IGNORE).sum())
    unpacked = _build(*_argv(tmp_path / "b", data, base_dir, *common))  # neither split packed
    reference = next(iter(unpacked.get_eval_dataloader()))
    assert supervised == int((reference["labels"] != IGNORE).sum()) > 0  # one eval batch: every conversation
    assert trainer.evaluate()["eval_loss"] == pytest.approx(unpacked.evaluate()["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--packing_strategy", "wrapped"], r"packing_strategy='wrapped' packs a token stream, .* --packing_algorithm"),
    (["--packing", "--packing_strategy", "bfd_split"], r"packing_strategy='bfd_split'"),
    (["--use_peft", "--lora_task_type", "SEQ_CLS"], r"lora_task_type='SEQ_CLS': SFT trains the model as a causal LM"),
    (["--use_peft", "--lora_target_parameters", "experts"], r"lora_target_parameters .* has no target"),
    (["--init_from_preset", "tiny", "--model_name_or_path", "", "--model_revision", "v1"],
     r"model_revision='v1' selects a version of a hub model, but a preset is not one"),
    (["--chat_template_path", "template.jinja"], r"chat_template_path: the kit renders conversations with its own"),
    (["--packing", "--max_length", "None"], r"--packing / --eval_packing need --max_length"),
    (["--eval_dataset_name", "easy_vqa"], r"--eval_dataset_name easy_vqa goes with --dataset_name easy_vqa"),
])
def test_options_the_kit_cannot_apply_are_refused(base_dir, data, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        _build(*_argv(tmp_path / "out", data, base_dir, *extra))


def test_a_mammoth_split_index_row_without_a_path_is_named_with_the_format_hint():
    # a file of samples given as a split index: every row names itself, and says which format reads it
    sample_row = {"id": "s1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                   {"from": "gpt", "value": "Hello"}]}
    with pytest.raises(BadSampleError, match=r"row 3.*needs a `path`.*--dataset_format mammoth") as caught:
        to_sft_sample(sample_row, "mammoth_split", index=3, sample_dir=".")
    assert caught.value.kind == "bad_index_row"


# --- 5. options TRL applies only where the kit replaces TRL's own parts ----------------------------------------------

def test_pad_token_is_what_the_collator_pads_with(base_dir, data, tmp_path):
    trainer = _build(*_argv(tmp_path / "out", data, base_dir, "--pad_token", "<|im_end|>"))
    rows = sorted((trainer.train_dataset[i] for i in range(4)), key=lambda row: len(row["input_ids"]))
    batch = trainer.data_collator([rows[0], rows[-1]])
    assert len(rows[0]["input_ids"]) < len(rows[-1]["input_ids"])  # the shorter row is padded
    assert set(batch["input_ids"][batch["attention_mask"] == 0].tolist()) == {151645}
    assert trainer.processing_class.tokenizer.pad_token == "<|im_end|>"
    with pytest.raises(ValueError, match=r"--pad_token '<nope>' is not a token of the tokenizer's vocabulary"):
        _build(*_argv(tmp_path / "bad", data, base_dir, "--pad_token", "<nope>"))


def test_dtype_applies_to_a_preset_model_too():
    from recipes.sft_model import load_model_and_processor

    model, _ = load_model_and_processor(None, init_from_preset="tiny", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_the_saved_training_args_record_the_packing_and_loss_the_run_used(base_dir, data, tmp_path):
    trainer = _build(*_argv(tmp_path / "out", data, base_dir, "--packing", "--assistant_only_loss", "true"))
    trainer.save_model(str(tmp_path / "saved"))
    recorded = torch.load(tmp_path / "saved" / "training_args.bin", weights_only=False)
    assert recorded.packing is True and recorded.assistant_only_loss is True
    assert trainer.kit_packing is True


def test_easy_vqa_as_eval_data_is_its_test_split_with_its_own_images(base_dir, tmp_path):
    import easy_vqa

    trainer = _build("--output_dir", str(tmp_path / "out"), "--dataset_name", "easy_vqa", "--eval_dataset_name",
                     "easy_vqa", "--easy_vqa_limit", "6", "--model_name_or_path", str(base_dir), "--max_steps", "1",
                     "--max_length", "256", "--bf16", "false", "--use_cpu", "true", "--report_to", "none",
                     "--save_strategy", "no", "--activation_checkpointing", "false")
    test_paths = easy_vqa.get_test_image_paths()
    train_paths = easy_vqa.get_train_image_paths()
    assert len(trainer.eval_dataset) == 6 and len(trainer.train_dataset) == 6
    for split, dataset, paths in (("test", trainer.eval_dataset, test_paths), ("train", trainer.train_dataset,
                                                                                train_paths)):
        for row in dataset:
            image_id = int(row["sample_id"].split("-")[1])  # ids are <split>-<image id>-<turn>
            assert row["sample_id"].startswith(split)
            assert Path(row["images"][0]["path"]).read_bytes() == Path(paths[image_id]).read_bytes()


# --- 6. images the data may hold -------------------------------------------------------------------------------------

def test_a_cmyk_image_inside_a_message_part_trains_as_its_rgb_conversion(processor):
    rgb = Image.new("RGB", (24, 16), (200, 30, 90))
    cmyk = rgb.convert("CMYK")
    question = {"type": "text", "text": "What colour?"}
    sample, batch = _encode(processor, {"id": "cmyk", "messages": _messages([{"type": "image", "image": cmyk},
                                                                             question])})
    expected = processor(images=[cmyk.convert("RGB")], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], expected)


def test_a_shuffled_stream_names_a_bad_row_by_its_row_in_the_file(base_dir, tmp_path):
    image = tmp_path / "images" / "0.png"
    image.parent.mkdir()
    Image.new("RGB", (32, 32), (0, 128, 0)).save(image)
    rows = [{"messages": _messages([{"type": "image"}, {"type": "text", "text": f"q{i}"}], f"a{i}"),
             "images": ["images/missing.png" if i == 7 else "images/0.png"]} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    trainer = _build("--output_dir", str(out), "--dataset_name", str(tmp_path / "train.jsonl"), "--image_root",
                     str(tmp_path), "--model_name_or_path", str(base_dir), "--max_steps", "6",
                     "--per_device_train_batch_size", "4", "--max_length", "256", "--bf16", "false", "--use_cpu",
                     "true", "--report_to", "none", "--save_strategy", "no", "--activation_checkpointing", "false",
                     "--dataset_streaming", "--shuffle_dataset", "--shuffle_buffer_size", "24", "--skip_bad_samples",
                     "--learning_rate", "0")
    trainer.train()
    skipped = json.loads((out / "skipped_samples.json").read_text())["examples"]
    assert [(s["sample_id"], s["kind"]) for s in skipped] == [("row 7", "missing_image")]


# --- 5. content that vanished silently: system turns in compat, unrendered message fields, image columns -----------

def _skip_lines(caplog, sample_id):
    return [r.getMessage() for r in caplog.records if f"skipping sample {sample_id!r}" in r.getMessage()]


def test_a_compat_run_logs_its_dropped_system_turns_once_with_the_fix(base_dir, tmp_path, caplog):
    rows = [{"id": f"r{i}", "messages": ([{"role": "system", "content": "Be brief."}] if i % 3 == 0 else [])
             + _messages(f"Q{i}?", f"A{i}.")} for i in range(7)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = sum(any(m["role"] == "system" for m in row["messages"]) for row in rows)
    with caplog.at_level(logging.WARNING, logger="recipes.sft_data"):
        trainer = _build("--output_dir", str(tmp_path / "out"), "--dataset_name", str(tmp_path / "train.jsonl"),
                         "--model_name_or_path", str(base_dir), "--chat_format", "compat", "--max_length", "256",
                         "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no")
    assert len(trainer.train_dataset) == len(rows)
    lines = [r.getMessage() for r in caplog.records if "system_turns_dropped" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{expected} of {len(rows)} conversation(s) kept with content dropped")
    assert "no system role" in lines[0] and "--chat_format chatml" in lines[0]


def test_message_fields_the_templates_do_not_render_are_named_and_counted(processor, tmp_path, caplog):
    call = [{"type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]
    rows = [{"id": "tool-call", "messages": [{"role": "user", "content": "Weather?"},
                                             {"role": "assistant", "content": "Checking.", "tool_calls": call}]},
            {"id": "reasoning", "messages": [{"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"}]},
            {"id": "good", "messages": _messages("Hi?", "Hi.")}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = load_raw_sft_dataset(str(tmp_path / "d.jsonl"))  # datasets fills the missing fields with nulls
    bad = [r["id"] for r in rows if any(set(m) - {"role", "content"} for m in r["messages"])]
    encoder = SFTEncoder(processor, "chatml", max_length=256)
    with pytest.raises(BadSampleError, match=r"sample 'tool-call': message 1 \(assistant\) has tool_calls, which "
                                             r"the kit's chat templates do not render"):
        encode_sft_dataset(raw, encoder)
    log = SkipLog()
    with caplog.at_level(logging.WARNING, logger="recipes.sft_data"):
        kept = encode_sft_dataset(raw, encoder, skip_bad_samples=True, skip_log=log)
    assert kept["sample_id"] == ["good"] and dict(log.counts) == {"bad_content": len(bad)}
    assert "has reasoning_content" in _skip_lines(caplog, "reasoning")[0]
    assert f"skipped {len(bad)} bad sample(s) (bad_content: {len(bad)}) of {len(rows)}" in caplog.text


def test_unmarked_images_with_no_string_user_message_are_named_not_a_bare_value_error(processor, tmp_path, caplog):
    image = tmp_path / "0.png"
    Image.new("RGB", (32, 32), (0, 0, 200)).save(image)
    question = {"type": "text", "text": "What shape?"}
    rows = [{"id": "unmarked", "messages": _messages([question], [{"type": "text", "text": "A."}]),
             "images": [str(image)]},
            {"id": "marked", "messages": _messages([{"type": "image"}, question], [{"type": "text", "text": "A."}]),
             "images": [str(image)]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = load_raw_sft_dataset(str(tmp_path / "d.jsonl"))
    unmarked = sum(not any(p["type"] == "image" for m in r["messages"] for p in m["content"]) for r in rows)
    with pytest.raises(BadSampleError, match=r"sample 'unmarked': no <image> marker or image part in the text but 1 "
                                             r"image\(s\).*mark each image with an image part"):
        to_sft_sample(rows[0], "messages")
    log = SkipLog()
    with caplog.at_level(logging.WARNING, logger="recipes.sft_data"):
        kept = encode_sft_dataset(raw, SFTEncoder(processor, "chatml"), skip_bad_samples=True, skip_log=log)
    assert kept["sample_id"] == ["marked"] and dict(log.counts) == {"image_count_mismatch": unmarked}
    assert len(_skip_lines(caplog, "unmarked")) == 1


def test_image_and_images_columns_of_one_file_are_both_read_and_two_filled_ones_are_a_conflict(tmp_path, caplog):
    for name in ("0.png", "1.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / name)
    turn = [{"from": "gpt", "value": "A."}]
    rows = [{"id": "one", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nQ"}] + turn},
            {"id": "two", "images": ["0.png", "1.png"],
             "conversations": [{"from": "human", "value": "<image><image>\nQ"}] + turn},
            {"id": "both", "image": "0.png", "images": ["1.png"],
             "conversations": [{"from": "human", "value": "<image>\nQ"}] + turn}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    raw = load_raw_sft_dataset(str(tmp_path / "d.json"))  # every row gets both columns, null where it had none
    both = [r["id"] for r in rows if r.get("image") and r.get("images")]
    log = SkipLog()
    with caplog.at_level(logging.WARNING, logger="recipes.sft_data"):
        samples = []
        for row in raw:
            try:
                samples.append(to_sft_sample(row, "llava", image_root=str(tmp_path)))
            except BadSampleError as error:
                log.add(error)
    assert {s.sample_id: len(s.images) for s in samples} == {
        r["id"]: len(r.get("images") or [r["image"]]) for r in rows if r["id"] not in both}
    assert dict(log.counts) == {"conflicting_images": len(both)}
    assert "1 image(s) in its `images` column and 1 in its `image` column" in _skip_lines(caplog, "both")[0]
