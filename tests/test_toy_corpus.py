"""recipes/training/toy_corpus.py: rewrites in place, several splits, the datasets cache, caption coverage."""

from pathlib import Path

import datasets
import pytest
import yaml

from recipes.training.toy_corpus import COLORS, SHAPES, easy_vqa_captions, write_toy_corpus


def _load(folder: Path, name: str, split: str, cache: Path) -> datasets.Dataset:
    return datasets.load_dataset(str(folder), name, split=split, cache_dir=str(cache))


def _uids(dataset: datasets.Dataset) -> list[str]:
    return [uid for row in dataset["uids"] for uid in row]


def test_rewrite_with_fewer_documents_leaves_no_old_shards(tmp_path, processor):
    folder = tmp_path / "corpus"
    write_toy_corpus(folder, processor, num_documents=60, capacity=256, rows_per_shard=1)
    name = write_toy_corpus(folder, processor, num_documents=8, capacity=256, rows_per_shard=1)
    loaded = _load(folder, name, "train", tmp_path / "cache")
    assert sorted(_uids(loaded)) == sorted(uid for uid, _, _ in easy_vqa_captions(8))
    assert len(list((folder / "data" / name).glob("train-*.parquet"))) == len(loaded)  # one pack per shard


def test_second_split_keeps_the_first_in_the_card(tmp_path, processor):
    folder = tmp_path / "corpus"
    write_toy_corpus(folder, processor, num_documents=20, capacity=256, split="train")
    name = write_toy_corpus(folder, processor, num_documents=12, capacity=256, split="test")
    card = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    (config,) = card["configs"]
    assert {entry["split"] for entry in config["data_files"]} == {"train", "test"}
    for split, count in (("train", 20), ("test", 12)):
        loaded = _load(folder, name, split, tmp_path / "cache")
        assert sorted(_uids(loaded)) == sorted(uid for uid, _, _ in easy_vqa_captions(count, split=split))


def test_rebuilt_corpus_is_not_read_from_a_stale_cache(tmp_path, processor):
    folder, cache = tmp_path / "corpus", tmp_path / "cache"
    name = write_toy_corpus(folder, processor, num_documents=20, capacity=256)
    before = _load(folder, name, "train", cache)
    write_toy_corpus(folder, processor, num_documents=20, capacity=256, max_facts=3)  # same shard names
    after = _load(folder, name, "train", cache)
    expected = {uid: caption for uid, _, caption in easy_vqa_captions(20, max_facts=3)}
    texts = {uid: text for uids, row in zip(after["uids"], after["texts"]) for uid, text in zip(uids, row)}
    assert texts == expected
    assert sorted(t for row in before["texts"] for t in row) != sorted(expected.values())


def _old_selection(split: str = "train") -> list[int]:
    """The images the corpus captioned before (two question forms): kept first so benchmark corpora stay the same."""
    import easy_vqa

    questions, answers, image_ids = (easy_vqa.get_train_questions() if split == "train"
                                     else easy_vqa.get_test_questions())
    color = {i for q, a, i in zip(questions, answers, image_ids) if a in COLORS and q.startswith("what color")}
    shape = {i for q, a, i in zip(questions, answers, image_ids) if a in SHAPES and q.startswith("what is the")}
    return sorted(color & shape)


def test_captions_cover_most_images_and_agree_with_their_answers():
    import easy_vqa

    rows = easy_vqa_captions()
    assert len(rows) > 3000 and len(rows) == len({uid for uid, _, _ in rows})  # of 4000; 668 before
    # Independent check: every direct colour or shape answer about an image agrees with its caption.
    caption = {int(uid.rsplit("-", 1)[1]): text for uid, _, text in rows}
    checked = 0
    for question, answer, image_id in zip(*easy_vqa.get_train_questions()):
        if image_id in caption and answer in COLORS + SHAPES and not question.startswith(("is", "does")):
            assert answer in caption[image_id].split(), (question, answer, caption[image_id])
            checked += 1
    assert checked > len(rows)
    # The corpora benchmarks and tests build (up to 668 documents) are unchanged: the old images, in the old order.
    old = _old_selection()
    assert [int(uid.rsplit("-", 1)[1]) for uid, _, _ in easy_vqa_captions(len(old))] == old
    with_facts = easy_vqa_captions(600, max_facts=12)
    assert with_facts == easy_vqa_captions(None, max_facts=12)[:600]


def test_asking_for_more_documents_than_exist_is_an_error():
    available = len(easy_vqa_captions(split="test"))
    assert len(easy_vqa_captions(available, split="test")) == available
    with pytest.raises(ValueError, match=f"easy-vqa test has {available} images with a known colour and shape, "
                                         f"{available + 1} documents were asked for"):
        easy_vqa_captions(available + 1, split="test")
