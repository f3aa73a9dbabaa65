"""PackedCollator: packed rows -> model inputs; attention isolation checked against documents run alone."""


import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from dataset_builders.packed_collator import IGNORE_INDEX, PackedCollator
from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration, format_pretraining_text

IMAGE_PAD = 151655

CAPTIONS = [
    "a red circle on a white background",
    "blue square",
    "a small green triangle next to a large yellow rectangle, drawn with thick lines",
    "grey shape",
    "an orange circle",
]


@pytest.fixture(scope="module")
def rows(easy_vqa_images):
    images = easy_vqa_images + easy_vqa_images[:1]
    return [
        {"images": images[:3], "texts": CAPTIONS[:3], "lengths": [0, 0, 0], "uids": ["a", "b", "c"]},
        {"images": images[3:5], "texts": CAPTIONS[3:5], "lengths": [0, 0], "uids": ["d", "e"]},
    ]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    torch.manual_seed(0)
    config = OpenQwen2VLConfig.tiny()
    return OpenQwen2VLForConditionalGeneration._from_config(config, attn_implementation=request.param).eval()


def _alone(model, processor, caption, image):
    """Logits and per-token loss of one document run on its own, through the processor (independent path)."""
    inputs = processor(text=format_pretraining_text(caption), images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    ids = inputs["input_ids"][0]
    return ids, logits


def _per_token_loss(logits, labels):
    """CE of position t predicting labels[t + 1]; NaN where not supervised."""
    targets = labels[1:]
    loss = F.cross_entropy(logits[:-1].float(), targets.clamp(min=0), reduction="none")
    return torch.where(targets == IGNORE_INDEX, torch.nan, loss)


def _run(model, batch):
    batch = dict(batch)
    batch.pop("num_real_tokens")
    with torch.no_grad():
        return model(**batch).logits


def test_document_ids_match_processor(processor, rows):
    collator = PackedCollator(processor)
    for caption, image in zip(CAPTIONS, rows[0]["images"] * 2):
        expected = processor(text=format_pretraining_text(caption), images=[image])["input_ids"][0]
        assert collator.document_ids([caption])[0] == expected


def test_isolated_logits_and_loss_equal_each_document_alone(model, processor, rows):
    _check_isolated(model, processor, rows)


@pytest.mark.slow
def test_isolated_with_flex_attention(tiny_config, processor, rows):
    """flex_attention gets the same block-causal mask (as a BlockMask); slow on CPU because it compiles."""
    torch.manual_seed(0)
    config = tiny_config  # a fresh config per test
    flex = OpenQwen2VLForConditionalGeneration._from_config(config, attn_implementation="flex_attention")
    _check_isolated(flex.eval(), processor, rows[:1])


def _check_isolated(model, processor, rows):
    collator = PackedCollator(processor, attention="isolated")
    batch = collator(rows)
    assert batch["attention_mask"] is None and batch["use_cache"] is False
    logits = _run(model, batch)
    checked = 0
    for b, row in enumerate(rows):
        offset = 0
        for caption, image in zip(row["texts"], row["images"]):
            ids, alone_logits = _alone(model, processor, caption, image)
            end = offset + ids.numel()
            assert torch.equal(batch["input_ids"][b, offset:end], ids)
            assert torch.equal(batch["position_ids"][b, offset:end], torch.arange(ids.numel()))
            torch.testing.assert_close(logits[b, offset:end], alone_logits, atol=1e-5, rtol=0)
            alone_labels = ids.masked_fill(ids == IMAGE_PAD, IGNORE_INDEX)
            packed_loss = _per_token_loss(logits[b, offset:end], batch["labels"][b, offset:end])
            alone_loss = _per_token_loss(alone_logits, alone_labels)
            torch.testing.assert_close(packed_loss, alone_loss, atol=1e-5, rtol=0, equal_nan=True)
            assert torch.isfinite(alone_loss).sum() >= 3
            checked += 1
            offset = end
    assert checked == sum(len(r["texts"]) for r in rows)


def test_faithful_equals_one_concatenated_sequence(model, processor, rows):
    collator = PackedCollator(processor, attention="faithful")
    batch = collator(rows)
    logits = _run(model, batch)
    for b, row in enumerate(rows):
        docs = [processor(text=format_pretraining_text(c), images=[i])["input_ids"][0] for c, i in
                zip(row["texts"], row["images"])]
        concat = torch.tensor([t for d in docs for t in d])
        pixels = processor.image_processor(row["images"], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected = model(input_ids=concat[None], pixel_values=pixels).logits[0]
        n = concat.numel()
        assert torch.equal(batch["input_ids"][b, :n], concat)
        assert torch.equal(batch["position_ids"][b, :n], torch.arange(n))
        torch.testing.assert_close(logits[b, :n], expected, atol=1e-5, rtol=0)
        # Labels: a copy of the ids with image placeholders ignored (later documents' <s> supervised, as the paper).
        expected_labels = concat.masked_fill(concat == IMAGE_PAD, IGNORE_INDEX)
        assert torch.equal(batch["labels"][b, :n], expected_labels)


@pytest.mark.parametrize("attention", ["faithful", "isolated"])
def test_padding_is_never_attended_nor_supervised(model, processor, rows, attention):
    batch = PackedCollator(processor, attention=attention)(rows)
    short = 1  # the second row is shorter, so it is padded
    real = int((batch["input_ids"][short] != processor.tokenizer.pad_token_id).sum())
    assert real < batch["input_ids"].shape[1]
    assert (batch["labels"][short, real:] == IGNORE_INDEX).all()
    assert batch["num_real_tokens"] == sum(
        len(d) for row in rows for d in PackedCollator(processor).document_ids(row["texts"])
    )
    changed = dict(batch)
    changed["input_ids"] = batch["input_ids"].clone()
    changed["input_ids"][short, real:] = 42  # different padding content must not change any real token
    torch.testing.assert_close(_run(model, changed)[:, :real], _run(model, batch)[:, :real], atol=1e-6, rtol=0)


def test_isolation_needs_no_mask_and_no_cache(tiny_model, processor, rows):
    """The transformers behaviour the isolated mode relies on: a 2-D mask or a cache makes documents leak again."""
    batch = PackedCollator(processor, attention="isolated")(rows[:1])
    isolated = _run(tiny_model, batch)
    second_doc = slice(len(PackedCollator(processor).document_ids(CAPTIONS[:1])[0]), None)
    leaky_mask = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
    leaky_cache = dict(batch, use_cache=True)
    for leaky in (leaky_mask, leaky_cache):
        diff = (_run(tiny_model, leaky)[0, second_doc] - isolated[0, second_doc]).abs().max()
        assert diff > 1e-3


def test_isolated_labels_skip_each_document_start(processor, rows):
    batch = PackedCollator(processor, attention="isolated")(rows)
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == IGNORE_INDEX).all()
    faithful = PackedCollator(processor, attention="faithful")(rows)
    later_bos = (faithful["input_ids"] == processor.tokenizer.bos_token_id) & (faithful["position_ids"] > 0)
    assert later_bos.sum() == 3 and (faithful["labels"][later_bos] == processor.tokenizer.bos_token_id).all()


def test_flash_varlen_kwargs_match_transformers(tiny_model, processor, rows):
    batch = PackedCollator(processor, attention="isolated", return_flash_attn_kwargs=True)(rows)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(batch["cu_seq_lens_q"], cu_q) and torch.equal(batch["cu_seq_lens_k"], cu_k)
    assert batch["max_length_q"] == int(max_q) == batch["max_length_k"] == int(max_k)
    # Non-flash kernels ignore them: same logits as the batch without.
    plain = PackedCollator(processor, attention="isolated")(rows)
    torch.testing.assert_close(_run(tiny_model, batch), _run(tiny_model, plain), atol=0, rtol=0)


def test_pixel_values_in_document_order(processor, rows):
    batch = PackedCollator(processor)(rows)
    images = rows[0]["images"] + rows[1]["images"]
    expected = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"], expected)
    per_image = processor.num_image_tokens
    assert int((batch["input_ids"] == IMAGE_PAD).sum()) == per_image * len(images)


def test_a_16_bit_image_is_scaled_not_clipped_whether_decoded_or_encoded(processor, rows):
    import io as _io

    import numpy as np
    from PIL import Image

    levels = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))  # a dark-to-bright ramp
    sixteen = Image.fromarray(levels)
    assert sixteen.mode == "I;16"  # what `datasets` hands over for a 16-bit PNG
    buffer = _io.BytesIO()
    sixteen.save(buffer, format="PNG")
    row = dict(rows[0], images=[sixteen] + rows[0]["images"][1:])
    encoded = dict(rows[0], images=[{"bytes": buffer.getvalue(), "path": None}] + rows[0]["images"][1:])
    eight = Image.fromarray(np.rint(levels / 257.0).astype(np.uint8)).convert("RGB")
    expected = processor.image_processor([eight], return_tensors="pt")["pixel_values"][0]
    for batch in (PackedCollator(processor)([row]), PackedCollator(processor)([encoded])):
        assert torch.allclose(batch["pixel_values"][0], expected, atol=1e-6)


def test_pad_to_multiple_of(processor, rows):
    batch = PackedCollator(processor, pad_to_multiple_of=64)(rows)
    assert batch["input_ids"].shape[1] % 64 == 0


def test_overlong_row_drops_trailing_documents_and_counts_them(processor, rows, caplog):
    lengths = [len(d) for d in PackedCollator(processor).document_ids(rows[0]["texts"])]
    collator = PackedCollator(processor, max_length=lengths[0] + lengths[1])
    batch = collator(rows[:1])
    assert batch["input_ids"].shape[1] == lengths[0] + lengths[1]
    assert batch["pixel_values"].shape[0] == 2
    assert collator.stats["documents_dropped_over_max_length"] == 1
    uids = rows[0]["uids"]
    total = sum(lengths)
    assert (f"the row re-tokenizes to {total} positions, over max_length={lengths[0] + lengths[1]} (this document: "
            f"{lengths[2]}); dropping document(s) 2 (uid {uids[2]})") in caplog.text
    with pytest.raises(ValueError, match=rf"document 0 \(uid {uids[0]}\) does not fit: the row re-tokenizes"):
        PackedCollator(processor, max_length=lengths[0] - 1, on_bad_document="raise")(rows[:1])
    # raise stops at any document that does not fit, not only a first one, naming it
    with pytest.raises(ValueError, match=rf"document 2 \(uid {uids[2]}\) does not fit: .* \(this document: "
                                         rf"{lengths[2]}\)"):
        PackedCollator(processor, max_length=lengths[0] + lengths[1], on_bad_document="raise")(rows[:1])
    # By default such a row is dropped whole (counted): here the batch keeps only the second row.
    dropping = PackedCollator(processor, max_length=lengths[0] - 1)
    batch = dropping([rows[0], dict(rows[1], images=rows[1]["images"][:1], texts=["a dot"], uids=["d"])])
    assert batch["input_ids"].shape[0] == 1 and batch["documents_dropped"] == 3
    assert dropping.stats["documents_dropped_over_max_length"] == 3


def test_bad_rows_raise_clear_errors(processor, rows):
    collator = PackedCollator(processor)
    row = rows[0]
    with pytest.raises(ValueError, match=r"uids \['a', 'b', 'c'\].*2 image\(s\) for 3 text\(s\)"):
        collator([dict(row, images=row["images"][:2])])
    strict = PackedCollator(processor, on_bad_document="raise")
    with pytest.raises(ValueError, match=r"document 1 \(uid b\) has an empty caption"):
        strict([dict(row, texts=["ok", "  ", "fine"])])
    with pytest.raises(ValueError, match=r"document 1 \(uid b\) is rejected: caption .* contains the image "
                                         r"placeholder token <\|image_pad\|>"):
        strict([dict(row, texts=["ok", "a <|image_pad|> sneaks in", "fine"])])
    with pytest.raises(ValueError, match=r"document 2 \(uid c\) has no image"):
        strict([dict(row, images=row["images"][:2] + [None])])
    # By default each of those documents is dropped, counted by reason; the row keeps its good documents.
    batch = collator([dict(row, texts=["ok", "  ", "a <|image_pad|> sneaks in"])])
    assert batch["documents_dropped"] == 2
    assert collator.stats["documents_dropped_empty_caption"] == 1
    assert collator.stats["documents_dropped_image_token_in_caption"] == 1
    expected = collator([dict(row, texts=["ok"], images=row["images"][:1], uids=["a"])])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    with pytest.raises(ValueError, match="attention must be one of"):
        PackedCollator(processor, attention="bidirectional")
    with pytest.raises(ValueError, match="empty batch"):
        collator([])


def test_literal_image_marker_in_caption_is_neutralised(processor, easy_vqa_images):
    batch = PackedCollator(processor)([{"images": easy_vqa_images[:1], "texts": ["see <image> here"],
                                        "lengths": [0], "uids": ["x"]}])
    assert int((batch["input_ids"] == IMAGE_PAD).sum()) == processor.num_image_tokens


def test_encoded_images_are_decoded_and_bad_ones_dropped_or_named(processor, rows, caplog):
    import io as _io

    row = rows[1]
    encoded = []
    for image in row["images"]:
        buffer = _io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    collator = PackedCollator(processor)
    expected = collator([row])["pixel_values"]
    assert torch.equal(collator([dict(row, images=encoded)])["pixel_values"], expected)

    # Default: the bad document leaves its row, counted and logged with its uid; the rest trains.
    bad = dict(row, images=[encoded[0], {"bytes": b"not an image", "path": None}])
    with caplog.at_level("WARNING", logger="dataset_builders.packed_collator"):
        batch = collator([rows[0], bad])
    alone = PackedCollator(processor)([rows[0], dict(row, images=row["images"][:1], texts=row["texts"][:1],
                                                     uids=["d"])])
    for key in ("input_ids", "labels", "position_ids", "pixel_values"):
        assert torch.equal(batch[key], alone[key]), key
    assert batch["documents_dropped"] == 1 and alone["documents_dropped"] == 0
    assert batch["uids"] == alone["uids"] == ["a", "b", "c", "d"]
    assert collator.stats["documents_dropped_bad_image"] == 1
    assert "document 1 (uid e) has an image that cannot be decoded" in caplog.text

    # A row with no decodable image leaves the batch; a batch with none trains on nothing, logged with its uids.
    hopeless = dict(row, images=[{"bytes": b"", "path": None}, {"bytes": b"\xff\xd8 junk", "path": None}])
    assert collator([rows[0], hopeless])["input_ids"].shape[0] == 1
    with caplog.at_level("WARNING", logger="dataset_builders.packed_collator"):
        empty = collator([hopeless])
    assert "no document of this batch is usable, all were dropped (uids ['d', 'e']" in caplog.text
    assert empty["input_ids"].tolist() == [[collator.pad_token_id]] and empty["labels"].tolist() == [[-100]]
    assert empty["num_real_tokens"] == 0 and empty["documents_dropped"] == 2 and empty["uids"] == []
    assert "pixel_values" not in empty and collator.stats["batches_without_documents"] == 1
    from recipes.training.loss import summed_lm_loss

    torch.manual_seed(0)
    model = OpenQwen2VLForConditionalGeneration(OpenQwen2VLConfig.tiny()).train()
    loss_sum, num_tokens = summed_lm_loss(model, empty)
    loss_sum.backward()  # no loss, and no NaN from a row without documents
    assert num_tokens == 0 and loss_sum.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    strict = PackedCollator(processor, on_bad_document="raise")
    with pytest.raises(ValueError, match=r"uids \['d', 'e'\]\): document 1 \(uid e\) has an image that cannot be "
                                         r"decoded: image_undecodable"):
        strict([bad])
    with pytest.raises(ValueError, match="on_bad_document must be one of"):
        PackedCollator(processor, on_bad_document="skip")


