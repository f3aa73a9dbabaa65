"""Data stages vs bare loops over the same shards, side by side.

(a) read -> select -> reshard (``run_select`` + ``run_reshard``, local executor, 1 worker) against a bare
    ``webdataset`` read-and-write loop (``WebDataset`` -> ``ShardWriter``) that copies every sample. With
    ``--verify-images quick`` the kit's stages check every image's header and truncation, count drops and write
    metadata parquets: target >= 0.8x. Reshard's default, ``full``, decodes every image (what guarantees the corpus
    loads); its row compares it with the same bare loop decoding every image too.
(b) CLIP scoring with a tiny random CLIP (``run_score`` + ``ClipScorer``) against a direct transformers loop
    (webdataset decode -> processor -> ``get_image_features``/``get_text_features`` -> cosine) with the same batch
    size. Target >= 0.9x.

Each side runs ``REPEATS`` times on fresh output folders; the table reports the best time of each.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from datatrove.utils.logging import logger  # noqa: E402

from bench._common import markdown_table, write_result  # noqa: E402
from dataset_builders.pipelines import ExecutorConfig, run_reshard, run_score, run_select  # noqa: E402
from dataset_builders.selection import SelectionRules  # noqa: E402
from dataset_builders.steps.clip_score import ClipScorer  # noqa: E402
from dataset_builders.synthetic import (  # noqa: E402
    caption,
    encode,
    save_tiny_clip,
    shape_image,
    write_metadata_parquet,
    write_shard,
)
from dataset_builders.uids import derive_uid  # noqa: E402

RESHARD_SHARDS, RESHARD_PER_SHARD = 16, 1000
CLIP_SHARDS, CLIP_PER_SHARD, CLIP_BATCH = 4, 2000, 32
REPEATS = 3  # per side, interleaved (baseline, kit, baseline, kit, ...) so load changes hit both


def make_shards(folder: Path, num_shards: int, per_shard: int, size: tuple[int, int], distinct: int = 200) -> int:
    """img2dataset-like shards (+ parquet); image bytes cycle through ``distinct`` JPEGs to keep setup fast."""
    rng = random.Random(0)
    images = [encode(shape_image(rng, *size), "JPEG", quality=90) for _ in range(distinct)]
    for shard in range(num_shards):
        members, rows = [], []
        for index in range(per_shard):
            key = f"{shard:05d}{index:04d}"
            text = caption(rng)
            meta = {"key": key, "uid": derive_uid("bench", key), "url": f"https://example.com/{key}.jpg",
                    "caption": text, "width": size[0], "height": size[1], "status": "success"}
            members += [(f"{key}.jpg", images[(shard * per_shard + index) % distinct]), (f"{key}.txt", text.encode()),
                        (f"{key}.json", __import__("json").dumps(meta).encode())]
            rows.append(meta)
        write_shard(str(folder / f"{shard:05d}.tar"), members)
        write_metadata_parquet(str(folder / f"{shard:05d}.parquet"), rows)
    return num_shards * per_shard


def shard_urls(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.tar"))


def bare_copy(folder: Path, out: Path) -> int:
    import webdataset as wds

    count = 0
    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=10_000, verbose=0) as sink:
        for sample in wds.WebDataset(shard_urls(folder), shardshuffle=False, empty_check=False):
            sink.write({"__key__": sample["__key__"], "jpg": sample["jpg"], "txt": sample["txt"],
                        "json": sample["json"]})
            count += 1
    return count


def bare_copy_decoding(folder: Path, out: Path) -> int:
    """The bare loop, also decoding every image (the work reshard's default full verification adds)."""
    import io

    import webdataset as wds
    from PIL import Image

    count = 0
    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=10_000, verbose=0) as sink:
        for sample in wds.WebDataset(shard_urls(folder), shardshuffle=False, empty_check=False):
            Image.open(io.BytesIO(sample["jpg"])).load()
            sink.write({"__key__": sample["__key__"], "jpg": sample["jpg"], "txt": sample["txt"],
                        "json": sample["json"]})
            count += 1
    return count


def kit_select_reshard(folder: Path, out: Path, verify_images: str) -> int:
    run_select(str(folder), str(out / "sel"), SelectionRules(), ExecutorConfig(workers=1))
    accounting = run_reshard(str(folder), str(out / "sel"), str(out / "corpus"), ExecutorConfig(workers=1),
                             verify_images=verify_images)
    return accounting.kept


def bare_clip(folder: Path, model_path: str, batch_size: int) -> int:
    import webdataset as wds
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(model_path).eval(), AutoProcessor.from_pretrained(model_path)
    dataset = wds.WebDataset(shard_urls(folder), shardshuffle=False, empty_check=False).decode("pilrgb").to_tuple(
        "jpg", "txt").batched(batch_size, partial=True)
    scores = []
    for images, captions in dataset:
        inputs = processor(text=list(captions), images=list(images), padding=True, truncation=True,
                           return_tensors="pt")
        with torch.inference_mode():
            image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            text = model.get_text_features(input_ids=inputs["input_ids"],
                                           attention_mask=inputs["attention_mask"]).pooler_output
        scores += torch.nn.functional.cosine_similarity(image, text).tolist()
    return len(scores)


def kit_clip(folder: Path, out: Path, model_path: str, batch_size: int) -> int:
    accounting = run_score(str(folder), str(out), ClipScorer(model_path, batch_size=batch_size, device="cpu"),
                           ExecutorConfig(workers=1, tasks=1))
    return accounting.kept


def best_times(baseline, kit, make_out, repeats: int = REPEATS) -> tuple[float, int, float, int]:
    """Best wall time and sample count of each side over interleaved repeats (the machine is shared)."""
    results = {"baseline": ([], 0), "kit": ([], 0)}
    for _ in range(repeats):
        for name, fn in (("baseline", baseline), ("kit", kit)):
            out = make_out()
            start = time.perf_counter()
            count = fn(out)
            results[name][0].append(time.perf_counter() - start)
            results[name] = (results[name][0], count)
            shutil.rmtree(out, ignore_errors=True)
    return min(results["baseline"][0]), results["baseline"][1], min(results["kit"][0]), results["kit"][1]


def main() -> None:
    torch.set_num_threads(1)
    logger.remove()  # datatrove's per-task console logs would drown the table
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        reshard_in, clip_in = work / "reshard_in", work / "clip_in"
        reshard_in.mkdir()
        clip_in.mkdir()
        total = make_shards(reshard_in, RESHARD_SHARDS, RESHARD_PER_SHARD, (256, 192))
        size_mb = sum(p.stat().st_size for p in reshard_in.glob("*.tar")) / 1e6
        counter = iter(range(1000))

        def fresh():
            return work / f"out{next(counter)}"

        bare_s, bare_n, kit_s, kit_n = best_times(lambda out: bare_copy(reshard_in, out),
                                                  lambda out: kit_select_reshard(reshard_in, out, "quick"), fresh)
        assert bare_n == kit_n == total, (bare_n, kit_n, total)
        full_bare_s, full_bare_n, full_s, full_n = best_times(
            lambda out: bare_copy_decoding(reshard_in, out),
            lambda out: kit_select_reshard(reshard_in, out, "full"), fresh)
        assert full_bare_n == full_n == total, (full_bare_n, full_n, total)

        clip_total = make_shards(clip_in, CLIP_SHARDS, CLIP_PER_SHARD, (128, 96))
        model_path = save_tiny_clip(str(work / "clip"), image_size=32)
        bare_clip_s, bare_clip_n, kit_clip_s, kit_clip_n = best_times(
            lambda out: bare_clip(clip_in, model_path, CLIP_BATCH),
            lambda out: kit_clip(clip_in, out, model_path, CLIP_BATCH), fresh)
        assert bare_clip_n == kit_clip_n == clip_total, (bare_clip_n, kit_clip_n, clip_total)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    data = f"{total} samples, {RESHARD_SHARDS} shards, {size_mb:.0f} MB"
    rows = [
        ["(a) read -> select -> reshard, --verify-images quick", data,
         f"{bare_n / bare_s:.0f}", f"{kit_n / kit_s:.0f}", f"{bare_s / kit_s:.2f}x", ">= 0.8x"],
        ["(a) the same, --verify-images full (default) vs a bare loop that decodes too", data,
         f"{full_bare_n / full_bare_s:.0f}", f"{full_n / full_s:.0f}", f"{full_bare_s / full_s:.2f}x", "-"],
        ["(b) CLIP scoring, tiny random CLIP", f"{clip_total} samples, batch {CLIP_BATCH}",
         f"{bare_clip_n / bare_clip_s:.0f}", f"{kit_clip_n / kit_clip_s:.0f}", f"{bare_clip_s / kit_clip_s:.2f}x",
         ">= 0.9x"],
    ]
    table = markdown_table(["benchmark", "data", "baseline samples/s", "kit samples/s", "kit / baseline", "target"],
                           rows)
    body = table + (
        "\n\nBaselines: (a) a bare `webdataset.WebDataset` -> `webdataset.ShardWriter` loop copying every sample "
        "(second row: also decoding every image with PIL); "
        "(b) a direct transformers loop (`WebDataset.decode('pilrgb')`, processor, `get_image_features` / "
        "`get_text_features`, cosine) with the same batch size. The kit side is the real stages on the local "
        "datatrove executor with one worker: (a) `select` (metadata from the shards' parquets, text rule on) then "
        "`reshard` (every image header- and truncation-checked, or fully decoded with the default `full`, tar + "
        "parquet written atomically, accounting); "
        "(b) `score clip` (full decode + RGB conversion, batched scoring, one parquet per shard). Best of "
        f"{REPEATS} interleaved runs each, 1 thread, including each stage's executor start-up and model loading."
    )
    print(body)
    write_result("data_stages", "Data stages: select + reshard and CLIP scoring vs bare loops", body)


if __name__ == "__main__":
    main()
