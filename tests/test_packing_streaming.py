"""StreamingPacker: every sample once, counted drops, exact resume (plain iterables and datasets streams)."""

import pickle

import datasets
import pytest

from dataset_builders.packed_collator import PackedCollator, PretrainingDocuments, stream_packed_rows
from dataset_builders.streaming_packing import Drop, StreamingPacker
from test_packing import caption_like_lengths


def _items(n, seed=5):
    return [{"i": i, "n": n_} for i, n_ in enumerate(caption_like_lengths(n, seed=seed))]


def _ids(packs):
    return [[x["i"] for x in pack] for pack in packs]


def test_every_sample_once_valid_packs_and_counted_drops():
    items = _items(12_000) + [{"i": -1, "n": 5000}, {"i": -2, "n": 0}, {"i": -3, "n": "bad"}]

    def length(item):
        return Drop("not_a_number", str(item["n"])) if isinstance(item["n"], str) else item["n"]

    packer = StreamingPacker(items, length, buffer_size=3000)
    packs = list(packer)
    assert sorted(i for pack in _ids(packs) for i in pack) == list(range(12_000))
    assert all(sum(x["n"] for x in pack) <= 4096 for pack in packs)
    assert packer.stats["dropped/too_long"] == 1
    assert packer.stats["dropped/empty"] == 1
    assert packer.stats["dropped/not_a_number"] == 1
    assert packer.stats["packs"] == len(packs)
    assert packer.stats["samples_packed"] == 12_000


def test_a_window_with_every_sample_dropped_does_not_end_the_stream():
    items = [{"i": -1 - i, "n": 0} for i in range(4)] + [{"i": i, "n": 100} for i in range(20)]
    packer = StreamingPacker(items, lambda x: x["n"], buffer_size=4)  # the first window: 4 empty samples
    packs = list(packer)
    assert sorted(i for pack in _ids(packs) for i in pack) == list(range(20))
    assert packer.stats["dropped/empty"] == 4 and packer.stats["samples_packed"] == 20


def test_window_packing_with_carry_fills_like_global_packing():
    items = _items(40_000, seed=2)
    total = sum(x["n"] for x in items)
    with_carry = list(StreamingPacker(items, lambda x: x["n"], buffer_size=5000))
    without = list(StreamingPacker(items, lambda x: x["n"], buffer_size=5000, carry_below=0))
    fill = total / (len(with_carry) * 4096)
    assert fill >= 0.995
    assert len(with_carry) <= len(without)


@pytest.mark.parametrize("stop_after", [1, 37, 40, 41, 200, None])  # windows hold ~40 packs; None: at the end
def test_resume_is_exact_for_a_plain_iterable(stop_after):
    items = _items(9_000, seed=7) + [{"i": -1, "n": 9999}]
    reference = StreamingPacker(items, lambda x: x["n"], buffer_size=1000)
    full = _ids(reference)
    stop_after = len(full) if stop_after is None else stop_after
    first = StreamingPacker(items, lambda x: x["n"], buffer_size=1000)
    iterator = iter(first)
    head = [next(iterator) for _ in range(stop_after)]
    state = pickle.loads(pickle.dumps(first.state_dict()))  # checkpoints are pickled
    resumed = StreamingPacker(items, lambda x: x["n"], buffer_size=1000)
    resumed.load_state_dict(state)
    assert _ids(head) + _ids(resumed) == full
    assert resumed.stats == reference.stats


def test_resume_is_exact_for_a_datasets_iterable_dataset():
    lengths = caption_like_lengths(6_000, seed=11)
    stream = datasets.Dataset.from_dict({"i": list(range(len(lengths))), "n": lengths}).to_iterable_dataset(4)
    full = _ids(StreamingPacker(stream, lambda x: x["n"], buffer_size=700))
    first = StreamingPacker(stream, lambda x: x["n"], buffer_size=700)
    iterator = iter(first)
    head = [next(iterator) for _ in range(90)]
    state = first.state_dict()
    assert isinstance(state["window_start"], dict)  # the dataset's own state, not a count
    resumed = StreamingPacker(stream, lambda x: x["n"], buffer_size=700)
    resumed.load_state_dict(state)
    assert _ids(head) + _ids(resumed) == full


def _stream(n=200, shards=2):
    return datasets.Dataset.from_dict({"i": list(range(n)), "n": [100 + (i * 37) % 300 for i in range(n)]}
                                      ).to_iterable_dataset(shards)


def _packer(stream, buffer_size=80):
    return StreamingPacker(stream, lambda x: x["n"], capacity=1024, buffer_size=buffer_size)


def _resume(state, stream=None, buffer_size=80):
    resumed = _packer(stream if stream is not None else _stream(), buffer_size)  # a restarted job: fresh objects
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    return resumed


def test_resume_twice_from_a_first_window_is_exact():
    """Checkpoint, resume, checkpoint again in the resumed run's first window, resume again (fresh objects each
    time): the state saved after a resume still points at that window, not at the stream's start."""
    def stream():
        return _stream(300, shards=3)

    full = _ids(_packer(stream(), 100))
    first = iter(packer := _packer(stream(), 100))
    head = [next(first) for _ in range(30)]  # a few windows in
    resumed = _resume(packer.state_dict(), stream(), 100)
    middle_iterator = iter(resumed)
    middle = [next(middle_iterator) for _ in range(2)]
    again = _resume(resumed.state_dict(), stream(), 100)
    got = _ids(head) + _ids(middle) + _ids(again)
    assert got == full and sorted(i for pack in got for i in pack) == list(range(300))


def test_resume_after_a_peek_or_in_a_second_pass_is_exact():
    """The stream was iterated before (a peek at its first example, or the packer's previous pass): its state_dict()
    before the first item of the new pass is stale, and must not be recorded as the first window's start."""
    full = _ids(_packer(_stream()))
    peeked = _stream()
    next(iter(peeked))
    for passes in (0, 1):
        packer = _packer(peeked)
        for _ in range(passes):
            assert _ids(packer) == full
        iterator = iter(packer)
        head = [next(iterator) for _ in range(3)]  # in the pass's first window
        got = _ids(head) + _ids(_resume(packer.state_dict()))
        assert got == full, passes


def test_state_of_another_source_kind_is_refused():
    state = StreamingPacker([1, 2], lambda x: 1).state_dict()
    stream = datasets.Dataset.from_dict({"n": [1]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="different kind"):
        StreamingPacker(stream, lambda x: 1).load_state_dict(state)


@pytest.fixture(scope="module")
def examples(easy_vqa_images):
    captions = ["a red circle", "", "a blue <|image_pad|> square", "green", "a grey triangle " * 3, "yellow shape"]
    images = [easy_vqa_images[i % 4] for i in range(len(captions))]
    images[3] = None
    return [{"image": im, "text": t, "uid": f"u{i}"} for i, (im, t) in enumerate(zip(images, captions))]


def test_stream_packed_rows_from_a_streaming_dataset_feed_the_collator(processor, examples):
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "uid": datasets.Value("string")})
    stream = datasets.Dataset.from_list(examples, features=features).to_iterable_dataset()
    packer = stream_packed_rows(stream, processor, capacity=64, buffer_size=4, uid_column="uid")
    rows = list(packer)
    assert sorted(u for row in rows for u in row["uids"]) == ["u0", "u4", "u5"]
    assert {k: v for k, v in packer.stats.items() if k.startswith("dropped/")} == {
        "dropped/empty_caption": 1, "dropped/caption_has_image_token": 1, "dropped/missing_image": 1}
    collator = PackedCollator(processor, max_length=64)
    for row in rows:
        expected = [len(d) for d in collator.document_ids(row["texts"])]
        assert row["lengths"] == expected and sum(expected) <= 64
    batch = collator(rows)
    assert batch["pixel_values"].shape[0] == 3


def test_too_long_captions_are_dropped_or_truncated_to_fit(processor, easy_vqa_images):
    long = " ".join(f"word{i}" for i in range(200))
    example = {"image": easy_vqa_images[0], "text": long, "uid": "long"}
    documents = PretrainingDocuments(processor, capacity=64)
    assert documents([example])[0].length > 64  # the packer then drops it as too_long
    packer = StreamingPacker([example], documents, capacity=64, batched=True, output_fn=documents.to_row)
    assert list(packer) == [] and packer.stats["dropped/too_long"] == 1

    truncating = PretrainingDocuments(processor, capacity=64, truncate=True)
    packer = StreamingPacker([example], truncating, capacity=64, batched=True, output_fn=truncating.to_row)
    (row,) = list(packer)
    assert packer.stats["event/truncated"] == 1
    text = row["texts"][0]
    assert long.startswith(text) and len(text) < len(long)
    rebuilt = PackedCollator(processor).document_ids([text])[0]
    assert len(rebuilt) == row["lengths"][0] <= 64
    assert len(rebuilt) >= 60  # the prefix is as long as fits, not arbitrarily short


def test_truncation_keeps_a_true_prefix_of_multibyte_captions(processor, easy_vqa_images):
    """Byte-level BPE splits non-Latin characters over several ids: a cut between them must not end the caption in
    U+FFFD. Every capacity cuts a Greek/Chinese/emoji caption to a prefix of the original whose document fits."""
    caption = "Ελληνικά κείμενα με εικόνα 猫が座っている 🐈‍⬛ " * 4
    head = PretrainingDocuments(processor).head_length
    for capacity in range(head + 6, head + 60):
        documents = PretrainingDocuments(processor, capacity=capacity, truncate=True)
        (result,) = documents([{"image": easy_vqa_images[0], "text": caption, "uid": "greek"}])
        text = result.item["text"]
        assert caption.startswith(text) and "\ufffd" not in text, capacity
        assert result.length == len(PackedCollator(processor).document_ids([text])[0]) <= capacity


def test_a_caption_truncated_to_nothing_is_an_empty_caption_drop(processor, easy_vqa_images):
    head = PretrainingDocuments(processor).head_length
    documents = PretrainingDocuments(processor, capacity=head + 2, truncate=True)  # room for "\n" and EOS only
    (result,) = documents([{"image": easy_vqa_images[0], "text": "several words that cannot fit", "uid": "x"}])
    assert isinstance(result, Drop) and result.reason == "empty_caption" and "after truncation" in result.detail
    blank_head = PretrainingDocuments(processor, capacity=head + 6, truncate=True)
    blanks = "\t \n \u3000" * 50  # whitespace of many tokens: a prefix that fits holds only blanks
    (result,) = blank_head([{"image": easy_vqa_images[0], "text": blanks + "words", "uid": "y"}])
    assert isinstance(result, Drop) and result.reason == "empty_caption"


def test_pretraining_documents_need_image_tokens_with_a_bare_tokenizer(processor):
    with pytest.raises(ValueError, match="needs num_image_tokens"):
        PretrainingDocuments(processor.tokenizer)
    documents = PretrainingDocuments(processor.tokenizer, num_image_tokens=144)
    measured = documents([{"image": b"x", "text": "hello"}])[0]
    expected = 1 + 144 + len(processor.tokenizer.encode("\nhello<|im_end|>", add_special_tokens=False))
    assert measured.length == expected
