"""A small real packed caption corpus built offline from easy-vqa, for tests, the benchmark and CPU runs.

Each easy-vqa image (64x64, one coloured shape) gets the caption "a {color} {shape}" read from its own
question/answer pairs (``recipes.demo_data.image_attributes``); documents are packed with the kit's packing core
(``dataset_builders.packing``) and written as parquet shards with a dataset card, so
``load_dataset(folder, "packed_<tokens>")`` reads the packed rows (``images``, ``texts``, ``lengths``, ``uids``)
exactly as it reads a corpus made by ``python -m dataset_builders pack``. ``single``
writes one document per row instead (the unpacked baseline).
"""

from __future__ import annotations

from pathlib import Path

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_captions(limit: int | None = None, split: str = "train", max_facts: int = 0,
                      seed: int = 0) -> list[tuple[str, str, str]]:
    """``(uid, image_path, caption)`` per easy-vqa image whose colour and shape its questions reveal.

    The caption is "a {color} {shape}"; with ``max_facts`` > 0 it is followed by 0..max_facts of the image's own
    question/answer pairs (a seeded choice per image), so caption lengths vary as in web caption data. Asking for
    more than the split has (3,542 train, 880 test images) raises ``ValueError``.
    """
    import random

    import easy_vqa

    from recipes.demo_data import image_attributes

    questions, answers, image_ids = (easy_vqa.get_train_questions() if split == "train"
                                     else easy_vqa.get_test_questions())
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    attributes = image_attributes(split)
    color, shape, facts = {}, {}, {}
    for question, answer, image_id in zip(questions, answers, image_ids):
        facts.setdefault(image_id, []).append(f"{question} {answer}.")
        if answer in COLORS and question.startswith("what color"):
            color[image_id] = answer
        elif answer in SHAPES and question.startswith("what is the"):
            shape[image_id] = answer
    # The images the two question forms above reveal come first, in their old order, so a corpus of up to 668
    # (train) documents is the one earlier versions wrote (benchmarks, tests); image_attributes adds the rest.
    first = sorted(set(color) & set(shape))
    order = first + sorted(set(attributes) - set(first))
    if limit is not None and limit > len(order):
        raise ValueError(f"easy-vqa {split} has {len(order)} images with a known colour and shape, "
                         f"{limit} documents were asked for")
    rng = random.Random(seed)
    rows = []
    for image_id in order[:limit]:
        caption = "a {color} {shape}".format(**attributes[image_id])
        if max_facts:
            extra = facts[image_id][: rng.randint(0, max_facts)]
            caption = " ".join([caption + "."] + extra)
        rows.append((f"easyvqa-{split}-{image_id}", paths[image_id], caption))
    return rows


def write_toy_corpus(folder: str | Path, processor, num_documents: int = 64, capacity: int = 512,
                     single: bool = False, rows_per_shard: int = 16, split: str = "train", max_facts: int = 0) -> str:
    """Write the corpus under ``folder``; returns the dataset config name (``packed_<n>`` or ``single_<n>``)."""
    import datasets
    from PIL import Image

    from dataset_builders.packed_collator import PackedCollator
    from dataset_builders.packing import pack_lengths

    documents = easy_vqa_captions(num_documents, split=split, max_facts=max_facts)
    collator = PackedCollator(processor, max_length=capacity)
    lengths = [len(ids) for ids in collator.document_ids([caption for _, _, caption in documents])]
    bins = [[i] for i in range(len(documents))] if single else pack_lengths(lengths, capacity=capacity)
    name = f"{'single' if single else 'packed'}_{processor.num_image_tokens}"
    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "texts": datasets.List(datasets.Value("string")),
        "lengths": datasets.List(datasets.Value("int64")),
        "uids": datasets.List(datasets.Value("string")),
    })
    out = Path(folder) / "data" / name
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{split}-*.parquet"):  # a rewrite with fewer shards must not leave old ones to load
        stale.unlink()
    for shard, start in enumerate(range(0, len(bins), rows_per_shard)):
        rows = {"images": [], "texts": [], "lengths": [], "uids": []}
        for members in bins[start:start + rows_per_shard]:
            rows["images"].append([Image.open(documents[i][1]).convert("RGB") for i in members])
            rows["texts"].append([documents[i][2] for i in members])
            rows["lengths"].append([lengths[i] for i in members])
            rows["uids"].append([documents[i][0] for i in members])
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(out / f"{split}-{shard:05d}.parquet"))
    write_card(folder)
    return name


def write_card(folder: str | Path) -> None:
    """The folder's README.md: per config every split found on disk (``{split}-*.parquet``) and a content
    fingerprint, without which a corpus rewritten in place loads its old rows from datasets' cache."""
    import yaml

    from dataset_builders.cards import fingerprint_info

    configs, infos = [], []
    for config in sorted(p for p in (Path(folder) / "data").iterdir() if p.is_dir()):
        splits = sorted({f.name.rsplit("-", 1)[0] for f in config.glob("*-*.parquet")})
        if not splits:
            continue
        configs.append({"config_name": config.name, "data_files": [
            {"split": split, "path": f"data/{config.name}/{split}-*.parquet"} for split in splits]})
        infos.append(fingerprint_info(config.name, str(folder), [f"data/{config.name}/*.parquet"]))
    header = yaml.safe_dump({"configs": configs, "dataset_info": infos}, sort_keys=False)
    text = "Toy caption corpus from easy-vqa (MIT), written by recipes/training/toy_corpus.py."
    (Path(folder) / "README.md").write_text(f"---\n{header}---\n\n{text}\n", encoding="utf-8")


__all__ = ["easy_vqa_captions", "write_card", "write_toy_corpus"]
