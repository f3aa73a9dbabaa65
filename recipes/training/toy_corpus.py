"""A small real packed caption corpus built offline from easy-vqa, for tests, the benchmark and CPU runs.

Each easy-vqa image (64x64, one coloured shape) gets the caption "a {color} {shape}" read from its own
question/answer pairs; documents are packed with the kit's packing core (``dataset_builders.packing``) and written
as parquet shards with a dataset card, so ``load_dataset(folder, "packed_<tokens>")`` reads the packed rows
(``images``, ``texts``, ``lengths``, ``uids``) exactly as it reads a corpus made by ``python -m dataset_builders
pack``. ``single`` writes one document per row instead (the unpacked baseline).
"""

from __future__ import annotations

from pathlib import Path

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_captions(limit: int | None = None, split: str = "train", max_facts: int = 0,
                      seed: int = 0) -> list[tuple[str, str, str]]:
    """``(uid, image_path, caption)`` per easy-vqa image whose colour and shape its questions reveal.

    The caption is "a {color} {shape}"; with ``max_facts`` > 0 it is followed by 0..max_facts of the image's own
    question/answer pairs (a seeded choice per image), so caption lengths vary as in web caption data.
    """
    import random

    import easy_vqa

    questions, answers, image_ids = (easy_vqa.get_train_questions() if split == "train"
                                     else easy_vqa.get_test_questions())
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    color, shape, facts = {}, {}, {}
    for question, answer, image_id in zip(questions, answers, image_ids):
        facts.setdefault(image_id, []).append(f"{question} {answer}.")
        if answer in COLORS and question.startswith("what color"):
            color[image_id] = answer
        elif answer in SHAPES and question.startswith("what is the"):
            shape[image_id] = answer
    rng = random.Random(seed)
    rows = []
    for image_id in sorted(set(color) & set(shape)):
        caption = f"a {color[image_id]} {shape[image_id]}"
        if max_facts:
            extra = facts[image_id][: rng.randint(0, max_facts)]
            caption = " ".join([caption + "."] + extra)
        rows.append((f"easyvqa-{split}-{image_id}", paths[image_id], caption))
        if limit is not None and len(rows) >= limit:
            break
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
    for shard, start in enumerate(range(0, len(bins), rows_per_shard)):
        rows = {"images": [], "texts": [], "lengths": [], "uids": []}
        for members in bins[start:start + rows_per_shard]:
            rows["images"].append([Image.open(documents[i][1]).convert("RGB") for i in members])
            rows["texts"].append([documents[i][2] for i in members])
            rows["lengths"].append([lengths[i] for i in members])
            rows["uids"].append([documents[i][0] for i in members])
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(out / f"{split}-{shard:05d}.parquet"))
    card = Path(folder) / "README.md"
    configs = sorted({p.name for p in (Path(folder) / "data").iterdir() if p.is_dir()})
    lines = ["---", "configs:"]
    for config in configs:
        lines += [f"- config_name: {config}", "  data_files:", f"  - split: {split}",
                  f"    path: data/{config}/{split}-*.parquet"]
    lines += ["---", "", "Toy caption corpus from easy-vqa (MIT), written by recipes/training/toy_corpus.py.", ""]
    card.write_text("\n".join(lines), encoding="utf-8")
    return name


__all__ = ["easy_vqa_captions", "write_toy_corpus"]
