"""``pack``: an image-text corpus -> packed parquet shards + dataset-card config + packing statistics.

    python -m dataset_builders pack --input <shards folder | dataset> --output <corpus folder> [--config-name packed_144]

The input is either a folder of WebDataset shards (the data stages' output) or anything ``load_dataset`` reads
(a hub id, a local folder with parquet/imagefolder/json, ...); its image column is an ``Image`` feature, image file
paths (json/csv; a relative path is read from the working folder, as datasets' ``Image`` does) or encoded bytes. An
image file that cannot be read is a counted drop (``image_unreadable``), logged with its path. The output folder
gets ``<config>/*.parquet``, ``<config>/packing_stats.json`` (fill, documents/images/positions per pack, drops by
reason) and a ``README.md`` whose ``configs:`` entry makes ``load_dataset(output, "<config>", split="train")`` (and
``streaming=True``) work; other configs already in that card are kept. A config folder holding packs the run does
not make (an earlier run's) is refused before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..accounting import PACKING_STATS_FILE, Accounting
from ..packing import ALGORITHMS, DEFAULT_CAPACITY
from .common import add_executor_arguments, executor_config

CARD_BODY = """
# Packed Open-Qwen2VL pretraining corpus

Each `packed_*` config holds image-caption samples packed into fixed-capacity sequences by
`python -m dataset_builders pack` (the Open-Qwen2VL kit). A row is one pack: `images` (list of images), `texts`
(one caption per document; document *i* uses `images[i]`), `lengths` (positions per document: caption tokens +
`<s>`, `\\n`, `<|im_end|>` + the image tokens) and `uids`. Document *i* is rendered as
`<s><image>\\n{texts[i]}<|im_end|>`; `dataset_builders.packed_collator.PackedCollator` turns rows into model inputs
(paper-faithful or isolated attention). Packing statistics are in `<config>/packing_stats.json`.
"""


@dataclass
class PackSettings:
    """What a packed corpus is made with (stored in its stats; a rerun into the same folder must match)."""

    config_name: str | None = None  # default packed_<num_image_tokens>
    num_image_tokens: int = 144
    capacity: int = DEFAULT_CAPACITY
    algorithm: str = "default"
    buffer_size: int = 10_000
    tokenizer: str | None = None
    truncate: bool = False
    image_column: str = "image"
    text_column: str = "text"
    uid_column: str | None = None
    dataset_config: str | None = None
    split: str = "train"

    def __post_init__(self):
        _check_sizes(self.num_image_tokens, self.capacity, self.buffer_size)
        self.config_name = self.config_name or f"packed_{self.num_image_tokens}"


def _check_sizes(num_image_tokens: int, capacity: int, buffer_size: int) -> None:
    """Refuse, before anything is written, sizes no pretraining run can use: the model and the training arguments
    take only a positive perfect square of image tokens (the projector pools the patch grid to a square), and a pack
    must hold at least one image."""
    from modeling_open_qwen2vl.configuration_open_qwen2vl import is_square_token_count

    if not is_square_token_count(num_image_tokens):
        raise ValueError(f"--num-image-tokens {num_image_tokens} is not a positive perfect square (144, 729, ...): "
                         "no Open-Qwen2VL model could train on the packs")
    if capacity <= num_image_tokens:
        raise ValueError(f"--capacity {capacity} cannot hold one document of {num_image_tokens} image tokens plus "
                         "its caption: every sample would be dropped as too_long")
    if buffer_size < 1:
        raise ValueError(f"--buffer-size must be >= 1, got {buffer_size}")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pack", help="pack image-caption samples into 4096-position sequences (parquet + dataset card)",
        description="Multimodal sequence packing as the paper (first-fit-decreasing with --algorithm ffd) or with "
                    "the kit's exact-fill default; writes parquet shards, a dataset-card config and statistics.",
    )
    parser.add_argument("--input", required=True,
                        help="folder (or fsspec URL) of *.tar shards, or a dataset id/folder load_dataset reads")
    parser.add_argument("--output", required=True, help="corpus folder: <config>/*.parquet, README.md card")
    parser.add_argument("--config-name", default=None, help="card config (default packed_<num-image-tokens>)")
    parser.add_argument("--num-image-tokens", type=int, default=144,
                        help="positions per image, a positive perfect square as the model takes (default 144)")
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="positions per pack (default 4096)")
    parser.add_argument("--algorithm", default="default", choices=("default",) + ALGORITHMS,
                        help="default = exact fill (best); ffd = the paper's first-fit-decreasing")
    parser.add_argument("--buffer-size", type=int, default=10_000,
                        help="samples packed together per window (memory bound; default 10000)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder, hub id or tokenizer.json (default: offline Qwen2.5 tokenizer)")
    parser.add_argument("--truncate", action="store_true",
                        help="cut an over-long caption to its longest prefix that fits instead of dropping it as "
                        "too_long (one cut to blanks is dropped as empty_caption)")
    hf = parser.add_argument_group("datasets input (when --input is not a shard folder)")
    hf.add_argument("--dataset-config", default=None, help="config name passed to load_dataset")
    hf.add_argument("--split", default="train")
    hf.add_argument("--image-column", default="image",
                    help="an Image feature, image file paths (relative to the working folder) or image bytes")
    hf.add_argument("--text-column", default="text")
    hf.add_argument("--uid-column", default=None)
    add_executor_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    settings = PackSettings(
        config_name=args.config_name or f"packed_{args.num_image_tokens}", num_image_tokens=args.num_image_tokens,
        capacity=args.capacity, algorithm=args.algorithm, buffer_size=args.buffer_size, tokenizer=args.tokenizer,
        truncate=args.truncate, image_column=args.image_column, text_column=args.text_column,
        uid_column=args.uid_column, dataset_config=args.dataset_config, split=args.split,
    )
    stats = run_pack(args.input, args.output, settings, executor_config(args))
    if stats is None:
        print("pack: submitted")
        return 0
    # the other stages' summary, events included: a corrupt shard must show here, not only in the logs
    accounting = Accounting(read=stats["read"], kept=stats["documents"], dropped=stats["dropped"],
                            events=stats["events"])
    print(f"pack: {stats['packs']} packs of {stats['documents']} documents, fill {stats['fill']:.4%}; "
          f"{accounting.summary()}")
    return 0 if stats["balanced"] else 1


def run_pack(input_path: str, output_folder: str, settings: PackSettings | None = None, executor=None) -> dict | None:
    """Pack ``input_path`` into ``output_folder``; returns the packing statistics (None when submitted to Slurm)."""
    from ..pipelines import (
        ExecutorConfig,
        bind_settings,
        completed_tasks,
        make_executor,
        recorded_settings,
        refuse_unplanned_files,
        refuse_writing_into_inputs,
        run_executor,
        settings_differences,
    )
    from ..shards import list_shards, open_folder
    from ..steps.pack import ImageTextDatasetReader, PackWriter, packed_file_name
    from ..steps.reader import WebDatasetReader

    settings = settings or PackSettings()
    config = executor or ExecutorConfig()
    refuse_writing_into_inputs(output_folder, {"--input": input_path})
    shards = _shards_or_none(input_path, list_shards)
    if not shards and os.path.isdir(input_path) and _is_inside(output_folder, input_path):
        # load_dataset(input) reads a local folder recursively: the packs would become part of the input
        raise ValueError(f"the output folder {output_folder} is inside the dataset folder --input {input_path}, "
                         "whose files load_dataset reads; choose an --output outside it")
    if shards:
        reader = WebDatasetReader(input_path)
        tasks = config.tasks or len(shards)
    else:
        options = {"split": settings.split}
        if settings.dataset_config:
            options["name"] = settings.dataset_config
        reader = ImageTextDatasetReader(input_path, options, image_column=settings.image_column,
                                        text_column=settings.text_column, uid_column=settings.uid_column)
        tasks = config.tasks or 1
    writer = PackWriter(output_folder, settings.config_name, settings.num_image_tokens, settings.capacity,
                        settings.algorithm, settings.buffer_size, settings.tokenizer, settings.truncate)
    logging_dir = config.logging_dir or f"{output_folder.rstrip('/')}/.datatrove/pack-{settings.config_name}"
    recorded = {"input": input_path, "tasks": tasks, **settings.__dict__}
    packs = f"{settings.config_name}/*.parquet"
    planned = [f"{settings.config_name}/{packed_file_name(rank, tasks)}" for rank in range(tasks)]
    previous = recorded_settings(logging_dir)
    same_run = previous is not None and not settings_differences(previous, _as_recorded(recorded))
    if same_run:  # perhaps --input spelled otherwise: the recorded values stay (in this run's key order)
        recorded = {key: previous.get(key, value) for key, value in recorded.items()}
    if previous is None or same_run:  # other settings: bind_settings says what to do
        refuse_unplanned_files(output_folder, (packs,), set(planned), resumed=previous is not None,
                               logging_dir=logging_dir)
    # settings bind once a task completed or wrote its file (a failed first try, e.g. a mistyped --tokenizer, does not)
    started = completed_tasks(logging_dir) > 0 or bool(open_folder(output_folder).glob(packs))
    bind_settings(logging_dir, recorded, previous, started,
                  outputs=f"{open_folder(output_folder).path}/{packs}", conflict="was packed with other settings",
                  elsewhere="another --config-name or output folder")
    executor = make_executor([reader, writer], config, tasks, logging_dir, job_name="pack")
    if not run_executor(executor, config):
        return None
    stats = packing_statistics(logging_dir, settings, recorded)
    folder = open_folder(output_folder)
    with folder.open(f"{settings.config_name}/{PACKING_STATS_FILE}", "wt") as handle:
        json.dump(stats, handle, indent=2)
    write_card(output_folder, settings.config_name, planned)
    return stats


def _is_inside(folder: str, parent: str) -> bool:
    folder, parent = os.path.realpath(folder), os.path.realpath(parent)
    return folder != parent and os.path.commonpath([folder, parent]) == parent


def _shards_or_none(input_path: str, list_shards) -> list[str]:
    try:
        return list_shards(input_path)
    except (FileNotFoundError, NotADirectoryError, ValueError, OSError):
        return []


def _as_recorded(recorded: dict) -> dict:
    """``recorded`` as it reads back from settings.json."""
    return json.loads(json.dumps(recorded, sort_keys=True, default=str))


def packing_statistics(logging_dir: str, settings: PackSettings, recorded: dict) -> dict:
    """Fill, documents/images/positions per pack and drops by reason, summed over the tasks' datatrove stats."""
    from datatrove.io import get_datafolder
    from datatrove.utils.stats import PipelineStats

    from ..accounting import collect

    folder = get_datafolder(logging_dir)
    per_pack: dict[str, dict] = {}
    merged = None
    for name in folder.list_files("stats", glob_pattern="*.json") if folder.isdir("stats") else []:
        with folder.open(name, "rt") as handle:
            task = PipelineStats.from_json(json.load(handle))
        merged = task if merged is None else merged + task
    for step in merged.stats if merged is not None else []:
        for label in ("pack_positions", "pack_documents", "pack_images"):
            if label in step.stats:
                per_pack[label] = _summary(step.stats[label])
    accounting = collect(logging_dir)
    packs = per_pack.get("pack_positions", {}).get("n", 0)
    positions = per_pack.get("pack_positions", {}).get("total", 0)
    return {
        **recorded,
        # The statistics travel with the corpus (and to the Hub): a local folder is named, not its machine's path.
        **{key: _published_source(recorded[key]) for key in ("input", "tokenizer") if recorded.get(key)},
        "packs": packs,
        "documents": accounting.kept,
        "positions": positions,
        "fill": positions / (packs * settings.capacity) if packs else 0.0,
        "positions_per_pack": per_pack.get("pack_positions", {}),
        "documents_per_pack": per_pack.get("pack_documents", {}),
        "images_per_pack": per_pack.get("pack_images", {}),
        "read": accounting.read,
        "dropped": dict(sorted(accounting.dropped.items())),
        "events": dict(sorted(accounting.events.items())),
        "balanced": accounting.balanced,
    }


def _published_source(source: str) -> str:
    """A hub id or URL as it is; a local path by its last component."""
    return Path(source).name if os.path.exists(source) else source


def _summary(metric) -> dict:
    # The attributes of MetricStats, not its compact dict: that leaves out n (and min, max) for a single value,
    # which read a one-pack corpus as 0 packs; from_dict restores them.
    from datatrove.utils.stats import MetricStats

    metric = metric if isinstance(metric, MetricStats) else MetricStats.from_dict(metric)
    return {key: getattr(metric, key) for key in ("total", "n", "mean", "min", "max")}


def write_card(output_folder: str, config_name: str, files: list[str] | None = None) -> None:
    """Add (or refresh) the ``config_name`` entry of the folder's dataset card and its ``dataset_info`` (pack count
    and content fingerprint, see ``cards.fingerprint_info``); other configs are kept. ``files``: the packs the run
    made (default: every parquet of the config): only they are counted, so a stray file in the folder makes the
    count differ from what datasets loads, which then fails instead of loading it."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from ..cards import fingerprint_info
    from ..shards import atomic_write, open_folder, parquet_on_this_thread

    folder = open_folder(output_folder)
    pattern = f"{config_name}/*.parquet"
    entry = {"config_name": config_name, "data_files": [{"split": "train", "path": pattern}]}
    packs = 0
    names = folder.glob(pattern) if files is None else [name for name in files if folder.exists(name)]
    for name in names:  # rows = packs, from the parquet footers
        with folder.open(name, "rb") as handle, parquet_on_this_thread(handle) as parquet_file:
            packs += parquet_file.metadata.num_rows
    # Without it, re-packing into the same path (or packing another corpus whose folder has the same name) loads
    # the old rows from datasets' cache.
    info = fingerprint_info(config_name, folder, [pattern], packs)
    if folder.exists("README.md"):
        with folder.open("README.md", "rt") as handle:
            card = DatasetCard(handle.read())
        configs = [c for c in (card.data.to_dict().get("configs") or []) if c.get("config_name") != config_name]
        card.data.configs = configs + [entry]
        infos = card.data.to_dict().get("dataset_info") or []
        infos = [infos] if isinstance(infos, dict) else infos
        card.data.dataset_info = [i for i in infos if i.get("config_name") != config_name] + [info]
        if CARD_BODY.strip() not in card.text:
            card.text = card.text.rstrip() + "\n" + CARD_BODY
    else:
        card = DatasetCard.from_template(DatasetCardData(configs=[entry], dataset_info=[info]),
                                         template_str="---\n{{ card_data }}\n---\n" + CARD_BODY)
    with atomic_write(folder, "README.md", "wt") as handle:  # the next pack merges into it: never half-written
        handle.write(str(card))
