"""Write easy-vqa (MIT, installed from PyPI) as an SFT dataset folder in the layouts ``recipes/sft.py`` reads.

The folder is self-contained: ``images/<id>.png`` copied from the package (``images_test/`` for the test split), and ``train.jsonl`` (TRL ``messages`` +
``images``, paths relative to the folder: pass the folder as ``--image_root``) or ``train.json`` (LLaVA
``conversations`` layout). ``turns`` > 1 groups several questions about the same image into one multi-turn
conversation (image in the first user turn).

    python -m recipes.sft_data.easy_vqa --output runs/easy_vqa_sft --limit 512
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict
from pathlib import Path


def _questions(split: str):
    import easy_vqa

    if split == "train":
        return easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    if split == "test":
        return easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    raise ValueError(f"easy-vqa has splits 'train' and 'test', not {split!r}")


def write_easy_vqa_sft(
    folder: str | Path,
    split: str = "train",
    limit: int | None = None,
    turns: int = 1,
    layout: str = "messages",
) -> Path:
    """Write up to ``limit`` conversations; returns the data file (``<split>.jsonl`` or ``<split>.json``)."""
    if layout not in ("messages", "llava"):
        raise ValueError(f"layout must be 'messages' or 'llava', got {layout!r}")
    folder = Path(folder)
    # each split's own folder: the two splits number their images alike, so a shared one would mix them up
    image_folder = "images" if split == "train" else f"images_{split}"
    (folder / image_folder).mkdir(parents=True, exist_ok=True)
    (questions, answers, image_ids), image_paths = _questions(split)
    by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids):
        by_image[image_id].append((question, answer))
    rows = []
    for image_id in sorted(by_image):
        qa = by_image[image_id]
        for start in range(0, len(qa), turns):
            if limit is not None and len(rows) >= limit:
                break
            image = f"{image_folder}/{image_id}.png"
            if not (folder / image).exists():
                shutil.copyfile(image_paths[image_id], folder / image)
            rows.append(_row(f"{split}-{image_id}-{start}", image, qa[start:start + turns], layout))
    if layout == "messages":
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        path = folder / f"{split}.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _row(sample_id: str, image: str, qa: list[tuple[str, str]], layout: str) -> dict:
    if layout == "llava":
        conversations = []
        for turn, (question, answer) in enumerate(qa):
            conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
            conversations.append({"from": "gpt", "value": answer})
        return {"id": sample_id, "image": image, "conversations": conversations}
    messages = []
    for turn, (question, answer) in enumerate(qa):
        text = [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": [{"type": "image"}] + text if turn == 0 else text})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {"id": sample_id, "messages": messages, "images": [image]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--turns", type=int, default=1)
    parser.add_argument("--layout", default="messages", choices=["messages", "llava"])
    args = parser.parse_args(argv)
    path = write_easy_vqa_sft(args.output, args.split, args.limit, args.turns, args.layout)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
