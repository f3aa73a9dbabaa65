"""SFT data: labels token by token against the templates, collation, every input layout, bad samples."""

import json
import logging

import pytest
import torch
from PIL import Image

from recipes.sft_data import (
    BadSampleError,
    PackedSFTCollator,
    SFTCollator,
    SFTEncoder,
    SkipLog,
    encode_sft_dataset,
    load_raw_sft_dataset,
    to_sft_sample,
)

IMG = 151655
N = 16  # tiny config's num_image_tokens
IGNORE = -100
SYSTEM_CHATML = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
SYSTEM_COMPAT = "<s>" + SYSTEM_CHATML


@pytest.fixture()
def image_dir(tmp_path, easy_vqa_images):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(easy_vqa_images):
        image.save(folder / f"{i}.png")
    return folder


def _conversation_with_middle_image():
    return [
        {"role": "user", "content": "What is this?"},
        {"role": "assistant", "content": "A shape."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Blue."},
    ]


def _expected(tokenizer, pieces):
    """pieces: (text | "IMAGE", supervised) -> ids and labels built with the plain tokenizer."""
    ids, labels = [], []
    for text, supervised in pieces:
        piece = [IMG] * N if text == "IMAGE" else tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if supervised else [IGNORE] * len(piece)
    return ids, labels


def _collate_one(processor, chat_format, messages, images, **encoder_kwargs):
    sample = to_sft_sample({"id": "conv-1", "messages": messages, "images": images}, "messages")
    encoded = SFTEncoder(processor, chat_format, **encoder_kwargs).encode(sample)
    row = {"sample_id": encoded.sample_id, "input_ids": encoded.input_ids, "labels": encoded.labels,
           "images": encoded.images}
    return SFTCollator(processor)([row])


def test_chatml_labels_token_by_token_multi_turn_image_in_middle_turn(processor, image_dir):
    batch = _collate_one(processor, "chatml", _conversation_with_middle_image(), [str(image_dir / "0.png")])
    ids, labels = _expected(processor.tokenizer, [
        (SYSTEM_CHATML + "<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n", False),
        ("A shape.<|im_end|>\n", True),
        ("<|im_start|>user\n", False), ("IMAGE", False),
        ("\nWhat colour?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Blue.<|im_end|>\n", True),
    ])
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    supervised = [t for t in batch["labels"][0].tolist() if t != IGNORE]
    assert processor.tokenizer.decode(supervised) == "A shape.<|im_end|>\nBlue.<|im_end|>\n"
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    assert batch["attention_mask"].all()


def test_compat_labels_token_by_token_multi_turn_image_in_middle_turn(compat_processor, image_dir):
    batch = _collate_one(compat_processor, "compat", _conversation_with_middle_image(), [str(image_dir / "0.png")])
    ids, labels = _expected(compat_processor.tokenizer, [
        (SYSTEM_COMPAT + "<|im_start|>user\nWhat is this?<|im_end|>assistant\n", False),
        ("A shape.<|im_end|>\n", True),
        ("<|im_start|>user\n", False), ("IMAGE", False), ("\nWhat colour?<|im_end|>assistant\n", False),
        ("Blue.<|im_end|>\n", True),
    ])
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels


def _llava_tokenizer_image_token(prompt, tokenizer):
    """LLaVA's tokenizer_image_token (per turn, -200 for each image; first token of each chunk skipped after BOS)."""
    chunks = [tokenizer.encode(c, add_special_tokens=False) for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(-200)
        ids.extend(chunk[offset:])
    return ids


def test_compat_first_turn_image_matches_the_original_per_turn_tokenization(compat_processor, image_dir):
    messages = [{"role": "user", "content": "<image>\nDescribe it."}, {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    batch = _collate_one(compat_processor, "compat", messages, [str(image_dir / "1.png")])
    tok = compat_processor.tokenizer
    turns = [(SYSTEM_COMPAT + "<|im_start|>user\n<image>\nDescribe it.<|im_end|>assistant\n", False),
             ("Red.<|im_end|>\n", True), ("<|im_start|>user\nSure?<|im_end|>assistant\n", False), ("Yes.<|im_end|>\n", True)]
    ids, labels = [], []
    for text, supervised in turns:  # the original: each turn tokenized alone, gpt turns supervised whole
        turn = [t for x in _llava_tokenizer_image_token(text, tok) for t in ([IMG] * N if x == -200 else [x])]
        ids += turn
        labels += [IGNORE if t == IMG else t for t in turn] if supervised else [IGNORE] * len(turn)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    assert batch["input_ids"][0].tolist()[ids.index(IMG) + N] != 198  # the quirk: "\n" after the image dropped


def test_batch_pads_right_and_text_only_rows_need_no_image(processor, image_dir):
    encoder = SFTEncoder(processor, "chatml")
    rows = []
    for i, (messages, images) in enumerate([
        ([{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A long answer here."}],
         [str(image_dir / "2.png")]),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], []),
    ]):
        enc = encoder.encode(to_sft_sample({"id": i, "messages": messages, "images": images}, "messages"))
        rows.append({"sample_id": enc.sample_id, "input_ids": enc.input_ids, "labels": enc.labels,
                     "images": enc.images})
    batch = SFTCollator(processor, pad_to_multiple_of=8)(rows)
    lengths = [len(r["input_ids"]) + (N - 1) * len(r["images"]) for r in rows]
    assert batch["input_ids"].shape[1] == -(-max(lengths) // 8) * 8
    assert batch["attention_mask"].sum(1).tolist() == lengths
    pad = processor.tokenizer.pad_token_id
    assert (batch["input_ids"][1, lengths[1]:] == pad).all() and (batch["labels"][1, lengths[1]:] == IGNORE).all()
    assert ((batch["input_ids"] == IMG) & (batch["labels"] != IGNORE)).sum() == 0
    assert batch["pixel_values"].shape[0] == 1
    text_only = SFTCollator(processor)([rows[1]])
    assert "pixel_values" not in text_only


def test_expansion_follows_num_image_tokens(processor, image_dir):
    sample = to_sft_sample({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
                            "images": [str(image_dir / "0.png")]}, "messages")
    enc = SFTEncoder(processor, "chatml", num_image_tokens=64).encode(sample)
    assert enc.input_ids.count(IMG) == 1  # stored compact
    row = {"sample_id": "a", "input_ids": enc.input_ids, "labels": enc.labels, "images": enc.images}
    assert int((SFTCollator(processor, num_image_tokens=64)([row])["input_ids"] == IMG).sum()) == 64


def _row(conversations, image=None, sample_id="s1"):
    row = {"id": sample_id, "conversations": conversations}
    if image is not None:
        row["image"] = image
    return row


GOOD = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A circle."}]


@pytest.mark.parametrize("row, kind, message", [
    (_row(GOOD, "nope.png"), "missing_image", r"sample 's1': image file .*nope.png does not exist"),
    (_row([{"from": "human", "value": "<image><image>\nWhat?"}, {"from": "gpt", "value": "A."}], "0.png"),
     "image_count_mismatch", r"2 <image> marker\(s\) in the text but 1 image\(s\)"),
    (_row([{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."}], ["0.png", "1.png"]),
     "image_count_mismatch", r"0 <image> marker\(s\) in the text but 2 image\(s\)"),
    (_row([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "  "}], "0.png"),
     "empty_assistant_turn", r"assistant turn \(message 1\) is empty"),
    (_row([{"from": "robot", "value": "hi"}], None), "bad_role", r"turn 0 is from 'robot'"),
])
def test_bad_samples_raise_an_error_naming_the_sample(row, kind, message, image_dir):
    with pytest.raises(BadSampleError, match=message) as info:
        to_sft_sample(row, "llava", image_root=str(image_dir))
    assert info.value.kind == kind and info.value.sample_id == "s1"


def test_too_long_after_image_expansion(processor, image_dir):
    sample = to_sft_sample(_row(GOOD, "0.png", "long-one"), "llava", image_root=str(image_dir))
    text_only_length = len(SFTEncoder(processor, "chatml", max_length=None).encode(sample).input_ids)
    encoder = SFTEncoder(processor, "chatml", max_length=text_only_length + N - 2)  # fits only before expansion
    with pytest.raises(BadSampleError, match=rf"sample 'long-one': {text_only_length + N - 1} positions after "
                                             rf"expanding 1 image\(s\) x 16 tokens, over max_length=\d+ "
                                             r"\(not truncated.*raise --max_length, or pass --skip_bad_samples"):
        encoder.encode(sample)


def _write_json(path, rows, lines=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if lines else json.dumps(rows))
    return str(path)


def test_skip_bad_samples_counts_each_kind_and_keeps_the_good_ones(processor, image_dir, tmp_path):
    rows = [
        _row(GOOD, "0.png", "ok-image"),
        _row(GOOD, "missing.png", "no-file"),
        _row([{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": ""}], "1.png", "empty"),
        _row([{"from": "human", "value": "text only"}, {"from": "gpt", "value": "fine"}], None, "ok-text"),
        _row([{"from": "human", "value": "Q " * 300}, {"from": "gpt", "value": "A"}], None, "too-long"),
    ]
    raw = load_raw_sft_dataset(_write_json(tmp_path / "llava.json", rows))
    encoder = SFTEncoder(processor, "chatml", max_length=256)
    with pytest.raises(BadSampleError, match="sample 'no-file'"):
        encode_sft_dataset(raw, encoder, image_root=str(image_dir))
    log = SkipLog()
    encoded = encode_sft_dataset(raw, encoder, image_root=str(image_dir), skip_bad_samples=True, skip_log=log)
    assert encoded["sample_id"] == ["ok-image", "ok-text"]
    assert dict(log.counts) == {"missing_image": 1, "empty_assistant_turn": 1, "too_long": 1}
    log.write(tmp_path / "skipped.json")
    report = json.loads((tmp_path / "skipped.json").read_text())
    assert report["total"] == 3 and {e["sample_id"] for e in report["examples"]} == {"no-file", "empty", "too-long"}


def test_a_skipped_sample_whose_id_holds_a_bar_is_reported_under_its_whole_id(processor, image_dir, tmp_path):
    """Skips travel through a dataset column as one string; ids such as "shard|key" come back whole, for both
    the map-style and the streaming path."""
    rows = [_row(GOOD, "missing.png", "shard-3|key|42"), _row(GOOD, "0.png", "ok")]
    path = _write_json(tmp_path / "llava.json", rows)
    encoder = SFTEncoder(processor, "chatml", max_length=256)
    for streaming in (False, True):
        raw = load_raw_sft_dataset(path)
        log = SkipLog()
        encoded = encode_sft_dataset(raw.to_iterable_dataset() if streaming else raw, encoder,
                                     image_root=str(image_dir), skip_bad_samples=True, skip_log=log)
        assert [row["sample_id"] for row in encoded] == ["ok"]
        assert [(e["sample_id"], e["kind"]) for e in log.examples] == [("shard-3|key|42", "missing_image")]
        assert "missing.png" in log.examples[0]["detail"]


def test_unreadable_image_is_named_at_collation_or_skipped(processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = {"sample_id": "good", "input_ids": [1, 2], "labels": [1, 2], "images": []}
    bad = {"sample_id": "bad", "input_ids": [IMG, 2], "labels": [IGNORE, 2],
           "images": [{"bytes": None, "path": str(broken)}]}
    with pytest.raises(BadSampleError, match=r"sample 'bad': cannot decode image .*broken.png"):
        SFTCollator(processor)([good, bad])
    collator = SFTCollator(processor, skip_bad_samples=True)
    batch = collator([good, bad])
    assert batch["input_ids"].tolist() == [[1, 2]] and dict(collator.skip_log.counts) == {"unreadable_image": 1}


def test_a_16_bit_image_is_scaled_to_8_bit_not_clipped_to_white(processor, tmp_path):
    import numpy as np

    levels = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    Image.fromarray(levels).save(tmp_path / "depth.png")  # saved as a 16-bit grey PNG
    row = {"sample_id": "depth", "input_ids": [IMG, 2], "labels": [IGNORE, 2],
           "images": [{"bytes": None, "path": str(tmp_path / "depth.png")}]}
    eight = Image.fromarray(np.rint(levels / 257.0).astype(np.uint8)).convert("RGB")
    expected = processor(images=[eight], return_tensors="pt")["pixel_values"]
    assert torch.allclose(SFTCollator(processor)([row])["pixel_values"], expected, atol=1e-6)


def test_a_batch_of_only_unreadable_images_trains_on_the_previous_good_sample_or_on_nothing(processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = {"sample_id": "good", "input_ids": [1, 2], "labels": [1, 2], "images": []}
    bad = [{"sample_id": f"bad{i}", "input_ids": [IMG, 2], "labels": [IGNORE, 2],
            "images": [{"bytes": None, "path": str(broken)}]} for i in range(2)]
    collator = SFTCollator(processor, skip_bad_samples=True)
    empty = collator(bad)  # nothing good seen yet: one padding token that carries no label
    assert empty["input_ids"].tolist() == [[processor.tokenizer.pad_token_id]]
    assert empty["labels"].tolist() == [[IGNORE]] and "pixel_values" not in empty
    packed = PackedSFTCollator(processor, skip_bad_samples=True)(
        [{name: [row[name] for row in bad] for name in ("sample_id", "input_ids", "labels", "images")}])
    assert packed["labels"].tolist() == [[IGNORE]] and packed["cu_seq_lens_q"].tolist() == [0, 1]
    collator([good, bad[0]])
    batch = collator(bad)
    assert batch["input_ids"].tolist() == [[1, 2]] and batch["labels"].tolist() == [[1, 2]]
    assert dict(collator.skip_log.counts) == {"unreadable_image": 5}


def _collate_in_workers(collator, batches):
    from torch.utils.data import DataLoader

    loader = DataLoader(batches, batch_size=None, num_workers=2, collate_fn=collator,
                        multiprocessing_context="spawn")
    return list(loader)


def test_skips_in_dataloader_workers_reach_the_report_through_the_spool(processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = {"sample_id": "good", "input_ids": [1, 2], "labels": [1, 2], "images": []}

    def bad(name):
        return {"sample_id": name, "input_ids": [IMG, 2], "labels": [IGNORE, 2],
                "images": [{"bytes": None, "path": str(broken)}]}

    # Four batches over two worker processes, one bad sample met twice (as in a second epoch).
    batches = [[good, bad("a")], [good, bad("b")], [good, bad("c")], [good, bad("a")]]
    plain = SFTCollator(processor, skip_bad_samples=True)
    assert len(_collate_in_workers(plain, batches)) == 4
    assert plain.skip_log.total == 0  # the workers counted into their own copies: the main process saw nothing
    spooled = SFTCollator(processor, skip_bad_samples=True, skip_log=SkipLog(spool_dir=tmp_path / "spool"))
    _collate_in_workers(spooled, batches)
    assert len(list((tmp_path / "spool").glob("*.jsonl"))) == 2  # one file per worker process
    spooled.skip_log.write(tmp_path / "skipped.json")
    report = json.loads((tmp_path / "skipped.json").read_text())
    assert report["total"] == 3 and report["counts"] == {"unreadable_image": 3}
    assert sorted(e["sample_id"] for e in report["examples"]) == ["a", "b", "c"]


def _conversation(i):
    return [{"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]


def _ids_by_sample(dataset):
    return {row["sample_id"]: (row["input_ids"], row["labels"], [im["path"] for im in row["images"]])
            for row in dataset}


def test_every_layout_gives_the_same_encoding(processor, image_dir, tmp_path):
    encoder = SFTEncoder(processor, "chatml")
    llava = [_row(_conversation(i), f"{i}.png", f"id{i}") for i in range(3)]
    llava.append(_row([{"from": "human", "value": "No image"}, {"from": "gpt", "value": "Ok."}], None, "text"))
    reference = _ids_by_sample(encode_sft_dataset(load_raw_sft_dataset(_write_json(tmp_path / "a.json", llava)),
                                                  encoder, image_root=str(image_dir)))
    assert reference["text"][2] == [] and reference["id0"][2] == [str(image_dir / "0.png")]

    mammoth = [{**r, "source": "synthetic"} for r in llava]
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    index = []
    for r in mammoth:
        (split_dir / f"{r['id']}.json").write_text(json.dumps(r))
        index.append({"path": f"{r['id']}.json", "length": 729})
    messages = [{"id": r["id"], "messages": [{"role": "user" if t["from"] == "human" else "assistant",
                                               "content": t["value"]} for t in r["conversations"]],
                 "images": [r["image"]] if "image" in r else []} for r in llava]
    cases = {
        "mammoth": (_write_json(tmp_path / "m.jsonl", mammoth, lines=True), {}),
        "mammoth_split": (_write_json(tmp_path / "index.jsonl", index, lines=True), {"sample_dir": str(split_dir)}),
        "messages": (_write_json(tmp_path / "msg.jsonl", messages, lines=True), {}),
    }
    for data_format, (path, extra) in cases.items():
        for streaming in (False, True):
            raw = load_raw_sft_dataset(path, streaming=streaming)
            got = _ids_by_sample(encode_sft_dataset(raw, encoder, image_root=str(image_dir), **extra))
            if data_format == "mammoth_split":  # samples are named by their file in the split layout
                got = {k.removesuffix(".json"): v for k, v in got.items()}
            assert got == reference, (data_format, streaming)


def test_trl_convention_puts_unmarked_images_in_the_first_user_turn(processor, image_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What shape?"},
                {"role": "assistant", "content": "circle"}]
    sample = to_sft_sample({"messages": messages, "images": [str(image_dir / "3.png")]}, "messages")
    text = SFTEncoder(processor, "chatml").render_segments(sample.messages)[0][0]
    assert text.endswith("<|im_start|>user\n<image>\nWhat shape?<|im_end|>\n<|im_start|>assistant\n")


def test_parquet_with_embedded_images_is_decoded_only_at_collation(processor, tmp_path, easy_vqa_images):
    import datasets

    ds = datasets.Dataset.from_dict({
        "messages": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]],
        "images": [[easy_vqa_images[0]]],
    })
    ds.to_parquet(str(tmp_path / "d.parquet"))
    raw = load_raw_sft_dataset(str(tmp_path / "d.parquet"))
    assert raw.features["images"].feature.decode is False
    encoded = encode_sft_dataset(raw, SFTEncoder(processor, "chatml"))
    row = encoded[0]
    assert row["images"][0]["bytes"] and row["images"][0]["path"] is None
    pixels = SFTCollator(processor)([row])["pixel_values"]
    expected = processor(images=[easy_vqa_images[0]], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, expected)


@pytest.mark.parametrize("streaming", [False, True])
def test_images_inside_message_parts_keep_their_bytes_until_collation(processor, tmp_path, streaming):
    """An image nested in a message's content parts (the TRL layout, typed ``datasets.Image``) is not decoded while
    the data is prepared: the encoded row carries the file's own JPEG bytes, not a PNG re-encoding of pixels."""
    import io

    import datasets

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    part = {"type": datasets.Value("string"), "text": datasets.Value("string"), "image": datasets.Image()}
    features = datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                             "content": datasets.List(part)})})
    messages = [{"role": "user", "content": [{"type": "image", "text": None, "image": {"bytes": jpeg, "path": None}},
                                             {"type": "text", "text": "Colour?", "image": None}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red", "image": None}]}]
    datasets.Dataset.from_dict({"messages": [messages]}, features=features).to_parquet(str(tmp_path / "d.parquet"))

    raw = load_raw_sft_dataset(str(tmp_path / "d.parquet"), streaming=streaming)
    assert raw.features["messages"].feature["content"].feature["image"].decode is False
    row = next(iter(encode_sft_dataset(raw, SFTEncoder(processor, "chatml"))))
    assert row["images"] == [{"bytes": jpeg, "path": None}]
    pixels = SFTCollator(processor)([row])["pixel_values"]
    expected = processor(images=[Image.open(io.BytesIO(jpeg))], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, expected)


def test_compat_requires_alternating_turns(compat_processor):
    sample = to_sft_sample({"id": "x", "messages": [{"role": "assistant", "content": "Hi"},
                                                    {"role": "user", "content": "Q"}]}, "messages")
    with pytest.raises(BadSampleError, match=r"sample 'x': the compat format needs alternating"):
        SFTEncoder(compat_processor, "compat").encode(sample)


def test_literal_image_pad_text_is_rejected(processor):
    sample = to_sft_sample({"id": "pad", "messages": [{"role": "user", "content": "look <|image_pad|>"},
                                                      {"role": "assistant", "content": "ok"}]}, "messages")
    with pytest.raises(BadSampleError, match=r"1 image placeholder\(s\) for 0 image\(s\)"):
        SFTEncoder(processor, "chatml").encode(sample)


def test_open_image_from_pil_roundtrip(processor, easy_vqa_images):
    from recipes.sft_data.formats import image_ref

    ref = image_ref(easy_vqa_images[1], None, "p")
    from recipes.sft_data import open_image

    assert list(open_image(ref, "p").convert("RGB").getdata()) == list(easy_vqa_images[1].getdata())
    assert isinstance(open_image(ref, "p"), Image.Image)


# --- compat drops system turns: counted and logged once with the reason, never silently ----------------------------

SYSTEM_ROWS = [
    {"id": "sys-first", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                                     {"role": "assistant", "content": "A1"}]},
    {"id": "plain", "messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
    {"id": "sys-twice", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q3"},
                                     {"role": "assistant", "content": "A3"}, {"role": "system", "content": "Now long."},
                                     {"role": "user", "content": "Q4"}, {"role": "assistant", "content": "A4"}]},
    {"id": "sys-bad-order", "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "assistant", "content": "A5"}]},  # skipped, so not "dropped"
]


def _with_system_turns(rows, skipped=("sys-bad-order",)):
    return sum(any(m["role"] == "system" for m in r["messages"]) for r in rows if r["id"] not in skipped)


def _drop_lines(caplog):
    return [r.getMessage() for r in caplog.records if "system_turns_dropped" in r.getMessage()]


def test_compat_counts_and_logs_dropped_system_turns_once_per_dataset(compat_processor, tmp_path, caplog):
    raw = load_raw_sft_dataset(_write_json(tmp_path / "sys.jsonl", SYSTEM_ROWS, lines=True))
    expected = _with_system_turns(SYSTEM_ROWS)
    log = SkipLog()
    with caplog.at_level(logging.WARNING, logger="recipes.sft_data"):
        encoded = encode_sft_dataset(raw, SFTEncoder(compat_processor, "compat"), skip_bad_samples=True,
                                     skip_log=log)
    assert encoded["sample_id"] == ["sys-first", "plain", "sys-twice"]
    assert not any("Be brief." in compat_processor.tokenizer.decode(ids) for ids in encoded["input_ids"])
    assert dict(log.dropped) == {"system_turns_dropped": expected} and dict(log.counts) == {"bad_role_order": 1}
    lines = _drop_lines(caplog)  # one line for the dataset, none per sample
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{expected} of {len(SYSTEM_ROWS)} conversation(s) kept with content dropped "
                               f"(system_turns_dropped: {expected}): system turn(s) dropped by chat_format 'compat'")
    assert "has no system role" in lines[0] and "--chat_format chatml" in lines[0]
    assert f"system_turns_dropped: {expected}" in log.summary()
    log.write(tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dropped_content"]["counts"] == {"system_turns_dropped": expected} and report["total"] == 1


def test_chatml_keeps_system_turns_and_reports_no_drop(processor, tmp_path, caplog):
    raw = load_raw_sft_dataset(_write_json(tmp_path / "sys.jsonl", SYSTEM_ROWS[:3], lines=True))
    log = SkipLog()
    with caplog.at_level(logging.WARNING, logger="recipes.sft_data"):
        encoded = encode_sft_dataset(raw, SFTEncoder(processor, "chatml"), skip_log=log)
    texts = [processor.tokenizer.decode(ids) for ids in encoded["input_ids"]]
    assert sum("Be brief." in text for text in texts) == _with_system_turns(SYSTEM_ROWS[:3])
    assert not log.dropped and not _drop_lines(caplog)


def test_streamed_compat_drops_are_logged_once_and_counted_once_per_sample_in_the_report(compat_processor, tmp_path,
                                                                                        caplog):
    raw = load_raw_sft_dataset(_write_json(tmp_path / "sys.jsonl", SYSTEM_ROWS[:3], lines=True), streaming=True)
    expected = _with_system_turns(SYSTEM_ROWS[:3])
    log = SkipLog(spool_dir=tmp_path / "spool")
    encoded = encode_sft_dataset(raw, SFTEncoder(compat_processor, "compat"), skip_log=log)
    with caplog.at_level(logging.WARNING, logger="recipes.sft_data"):
        for _ in range(2):  # two epochs: each sample is met twice
            assert [row["sample_id"] for row in encoded] == ["sys-first", "plain", "sys-twice"]
    lines = _drop_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("sample 'sys-first': system turn(s) dropped"), lines
    assert "--chat_format chatml" in lines[0]
    assert log.dropped["system_turns_dropped"] == 2 * expected  # this process's count, epoch by epoch
    log.write(tmp_path / "report.json")  # merged from the spool: each distinct sample once
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dropped_content"]["counts"] == {"system_turns_dropped": expected}
    assert {e["sample_id"] for e in report["dropped_content"]["examples"]} == {"sys-first", "sys-twice"}
    assert report["total"] == 0 and f"system_turns_dropped: {expected}" in log.summary()


def test_compat_names_an_image_in_a_system_turn_it_would_drop(compat_processor, processor, image_dir):
    messages = [{"role": "system", "content": [{"type": "image"}, {"type": "text", "text": "Style guide."}]},
                {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    sample = to_sft_sample({"id": "sys-image", "messages": messages, "images": [str(image_dir / "0.png")]},
                           "messages")
    with pytest.raises(BadSampleError, match=r"sample 'sys-image': 1 image\(s\) in a system turn, which the compat "
                                             r"format drops.*--chat_format chatml \[image_in_system_turn\]"):
        SFTEncoder(compat_processor, "compat").encode(sample)
    assert SFTEncoder(processor, "chatml").encode(sample).num_images == 1
