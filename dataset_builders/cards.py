"""Dataset cards whose YAML ``configs:`` name the corpus subsets, so ``load_dataset(folder, "<subset>")`` (and
``streaming=True``) reads the shards through datasets' own webdataset builder.

The folder layout is the released ``Open-Qwen2VL-Data`` one (one ``<name>_webdataset/`` folder of tars per subset),
so the same card works for a local folder and for a Hub dataset repository holding those folders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import yaml
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.utils.logging import logger

from .shards import SHARD_GLOB, atomic_write, parquet_on_this_thread

RELEASE_REPO = "weizhiwang/Open-Qwen2VL-Data"


@dataclass(frozen=True)
class Subset:
    folder: str
    description: str


# Config name -> folder. The folder names are those of the released data (read from the original packing scripts);
# ``datacomp_mlmf_su85`` alone is not in the release (only its union with DFN is) and is what ``select`` makes.
KNOWN_SUBSETS = {
    "ccs": Subset("ccs_webdataset", "CC3M + CC12M + SBU (BLIP's CapFilt/CLIP-filtered `ccs_filtered.json`), "
                                    "downloaded with img2dataset"),
    "datacomp_dfn": Subset("datacomp_medium_dfn_webdataset", "DataComp-medium samples whose uid is in the DFN "
                                                             "release `datacomp_medium_dfn_20m_inds.npy`"),
    "datacomp_mlmf_su85": Subset("datacomp_medium_mlm_filter_su_85_webdataset",
                                 "DataComp-medium with MLM-Filter semantic understanding >= 85"),
    "datacomp_mlmf_su85_union_dfn": Subset("datacomp_medium_mlm_filter_su_85_union_dfn_webdataset",
                                           "union of the MLM-Filter SU>=85 and DFN selections (uid de-duplicated), "
                                           "the DataComp part of Open-Qwen2VL's pretraining data"),
    "laion": Subset("laion_webdataset", "the LAION subset of the pretraining data"),
}
# Configs that concatenate subsets: the paper's pretraining mixture (train.sh: datacomp_hq + ccs + laion).
MIXTURES = {"pretraining": ("ccs", "datacomp_mlmf_su85_union_dfn", "laion")}
CARD_TITLE = "# Open-Qwen2VL pretraining corpora"
CARD_TEMPLATE = """{title}

Image-caption pairs in WebDataset shards (img2dataset layout: `KEY.jpg`, `KEY.txt`, `KEY.json` with `uid`, `url`,
`caption`, ... and one metadata parquet per shard), made with the Open-Qwen2VL kit's data stages
(`python -m dataset_builders score|select|reshard`).

## Subsets

{table}

## Loading

```python
from datasets import load_dataset

ds = load_dataset("{path}", "{example}", split="train")                  # decoded PIL images in ds["jpg"]
ds = load_dataset("{path}", "{example}", split="train", streaming=True)  # no download up front
```

Columns are the file extensions of the shards: `jpg` (image; the bytes are always a JPEG), `txt` (caption), `json`
(`uid`, `key`, `url`, `caption`, `width`, `height`, `source_shard`, `source_key`), `__key__`, `__url__`.
{accounting}"""


def subset_folder(name: str) -> str:
    """Folder of a subset: the released name for known subsets, ``<name>_webdataset`` otherwise."""
    return KNOWN_SUBSETS[name].folder if name in KNOWN_SUBSETS else f"{name}_webdataset"


def discover_subsets(root: DataFolderLike) -> dict[str, str]:
    """Subsets present under ``root``: known folders and any other ``*_webdataset`` folder holding tars."""
    folder = get_datafolder(root)
    by_folder = {subset.folder: name for name, subset in KNOWN_SUBSETS.items()}
    found = {}
    for path in folder.list_files(include_directories=True, recursive=False):
        if not folder.isdir(path) or not folder.glob(f"{path}/{SHARD_GLOB}"):
            continue
        if path in by_folder:
            found[by_folder[path]] = path
        elif path.endswith("_webdataset"):
            found[path[: -len("_webdataset")]] = path
    return dict(sorted(found.items()))


def card_configs(subsets: dict[str, str]) -> list[dict]:
    """YAML ``configs:`` entries: one per subset, plus mixtures whose parts are all present (one default)."""
    configs = [{"config_name": name, "data_files": [{"split": "train", "path": f"{folder}/{SHARD_GLOB}"}]}
               for name, folder in subsets.items()]
    for mixture, parts in MIXTURES.items():
        present = [p for p in parts if p in subsets]
        if len(present) >= 2:
            configs.append({"config_name": mixture, "data_files": [
                {"split": "train", "path": [f"{subsets[p]}/{SHARD_GLOB}" for p in present]}]})
    if configs:
        default = next((c for c in configs if c["config_name"] in MIXTURES), configs[0])
        default["default"] = True
    return configs


def _planned_shards(folder, subset_path: str) -> set[str] | None:
    """The shards ``reshard`` planned for a subset folder (from the plan in its logging folder), None without one."""
    plan = f"{subset_path}/.datatrove/reshard/plan.parquet"
    if not folder.exists(plan):
        return None
    from .steps.reshard import output_stem

    with folder.open(plan, "rb") as handle, parquet_on_this_thread(handle) as parquet_file:
        num_shards = parquet_file.metadata.num_row_groups if parquet_file.metadata.num_rows else 0
    return {f"{subset_path}/{output_stem(index, num_shards)}.tar" for index in range(num_shards)}


def _count(folder, subset_path: str, planned_only: bool = False) -> tuple[int, int | None]:
    """(shards, samples) of a subset folder; samples from the shards' metadata parquets when all exist.
    ``planned_only``: count only the shards its reshard plan made, so that a stray shard in the folder makes the
    card's count differ from what datasets loads (which then fails loudly) instead of being counted in."""
    tars = folder.glob(f"{subset_path}/{SHARD_GLOB}")
    planned = _planned_shards(folder, subset_path) if planned_only else None
    if planned is not None:
        stray = sorted(set(tars) - planned)
        if stray:
            logger.warning(f"{subset_path}: {len(stray)} shard(s) not made by its reshard run are left out of the "
                           f"card's counts: {', '.join(stray[:5])}")
        tars = [tar for tar in tars if tar in planned]
    samples = 0
    for tar in tars:
        parquet = tar[: -len(".tar")] + ".parquet"
        if not folder.exists(parquet):
            return len(tars), None
        with folder.open(parquet, "rb") as handle, parquet_on_this_thread(handle) as parquet_file:
            samples += parquet_file.metadata.num_rows  # the footer only
    return len(tars), samples


# What identifies a file's content in an fsspec listing: size plus the modification time and inode (local), ETag
# (object stores) or git blob id (Hub), whichever the filesystem gives.
_FILE_IDENTITY = ("size", "mtime", "ino", "ETag", "etag", "blob_id", "LastModified", "last_modified")


def config_split_patterns(config: dict) -> list[tuple[str, str]]:
    """(split, pattern) pairs of a card's ``configs:`` entry (a bare pattern or list of them is the train split)."""
    data_files = config.get("data_files") or []
    pairs = []
    for entry in data_files if isinstance(data_files, list) else [data_files]:
        split, paths = (entry.get("split", "train"), entry.get("path")) if isinstance(entry, dict) else ("train", entry)
        pairs += [(split, path) for path in ([paths] if isinstance(paths, str) else list(paths or []))]
    return pairs


def config_patterns(config: dict) -> list[str]:
    """The data file patterns of a card's ``configs:`` entry."""
    return [pattern for _, pattern in config_split_patterns(config)]


def _matching_files(root: DataFolderLike, patterns: list[str]) -> list[tuple[str, dict]]:
    """(name, fsspec info) of every file matching ``patterns`` under ``root``, in a stable order."""
    folder = get_datafolder(root)
    return [item for pattern in patterns for item in sorted(folder.glob(pattern, detail=True).items())]


def _fingerprint(files: list[tuple[str, dict]]) -> str:
    """md5 over the name, size and modification time (or ETag, blob id) of every file: rewriting any file changes
    it, even when the sample count stays the same."""
    digest = hashlib.md5()
    for name, info in files:
        identity = [str(info.get(key)) for key in _FILE_IDENTITY if info.get(key) is not None]
        digest.update("\x1f".join([name, *identity]).encode("utf-8", "backslashreplace") + b"\x1e")
    return digest.hexdigest()


def fingerprint_info(name: str, root: DataFolderLike, patterns: list[str], num_examples: int | None = None) -> dict:
    """A card ``dataset_info`` entry for the config ``name`` whose files match ``patterns`` under ``root``.

    datasets caches a local folder under its name and a hash of the card's ``dataset_info`` and configs only (not
    file paths or times), so the content fingerprint (in ``description``, the one free-text field) is what keeps a
    rewritten corpus, or another corpus of the same folder name, from loading stale rows. ``num_examples`` is
    checked by datasets after building (NonMatchingSplitsSizesError). datasets reads a ``splits`` entry only with
    ``num_bytes`` too (else it warns "Ignoring part of dataset_info" on every load); ours is the total size of the
    files (datasets compares only ``num_examples`` and records its own Arrow size once built)."""
    files = _matching_files(root, patterns)
    info: dict = {"config_name": name, "description": f"content fingerprint {_fingerprint(files)}"}
    if num_examples is not None:
        num_bytes = sum(int(details.get("size") or 0) for _, details in files)
        info["splits"] = [{"name": "train", "num_bytes": num_bytes, "num_examples": num_examples}]
    return info


def _dataset_info(configs: list[dict], subsets: dict[str, str], counts: dict, root: DataFolderLike) -> list[dict]:
    """Per config: a content fingerprint of its shards and, when every shard has its parquet, the sample count."""
    infos = []
    for config in configs:
        name = config["config_name"]
        parts = MIXTURES.get(name, (name,))
        samples = [counts[p][1] for p in parts if p in subsets]
        total = sum(samples) if samples and all(n is not None for n in samples) else None
        infos.append(fingerprint_info(name, root, config_patterns(config), total))
    return infos


def render_card(root: DataFolderLike, subsets: dict[str, str] | None = None, path_hint: str | None = None,
                accounting: dict | None = None) -> str:
    """README.md text for ``root`` (subsets discovered unless given)."""
    folder = get_datafolder(root)
    subsets = subsets if subsets is not None else discover_subsets(folder)
    if not subsets:
        raise FileNotFoundError(f"no subset folders with *.tar shards under {folder.path}")
    configs = card_configs(subsets)
    counts = {name: _count(folder, subset_path, planned_only=True) for name, subset_path in subsets.items()}
    header = yaml.safe_dump({"configs": configs, "dataset_info": _dataset_info(configs, subsets, counts, folder),
                             "task_categories": ["image-to-text"]}, sort_keys=False)
    rows = ["| config | folder | shards | samples | content |", "|---|---|---|---|---|"]
    for name, subset_path in subsets.items():
        shards, samples = counts[name]
        about = KNOWN_SUBSETS[name].description if name in KNOWN_SUBSETS else "made with the kit's data stages"
        rows.append(f"| `{name}` | `{subset_path}/` | {shards} | {samples if samples is not None else '?'} | {about} |")
    for config in configs:
        if config["config_name"] in MIXTURES:
            parts = ", ".join(f"`{p}`" for p in MIXTURES[config["config_name"]] if p in subsets)
            rows.append(f"| `{config['config_name']}` (default) | | | | concatenation of {parts} |")
    if accounting is None:  # what reshard recorded for each subset, if it made them
        accounting = {}
        for name, subset_path in subsets.items():
            record = f"{subset_path}/.datatrove/reshard/accounting.json"
            if folder.exists(record):
                with folder.open(record, "rt") as handle:
                    info = json.load(handle)
                accounting[name] = {k: info[k] for k in ("read", "kept", "dropped_by_reason") if k in info}
    extra = ""
    if accounting:
        extra = "\n## Accounting of each subset (`reshard`: read = kept + dropped)\n\n" + "\n".join(
            f"- `{name}`: {json.dumps(info, sort_keys=True)}" for name, info in sorted(accounting.items())) + "\n"
    body = CARD_TEMPLATE.format(title=CARD_TITLE, table="\n".join(rows), path=path_hint or "path/to/this/folder",
                                example=configs[0]["config_name"], accounting=extra)
    return f"---\n{header}---\n\n{body}"


def _merge_existing(text: str, existing: str) -> str:
    """Keep what others put in an existing card: other stages' configs and dataset_info entries (e.g. the ``pack``
    stage's ``packed_144``), its other metadata (license, language...) and its top-level ``# `` sections (the
    user's prose, the pack stage's section); ours are regenerated."""
    from huggingface_hub import DatasetCard

    new, old = DatasetCard(text), DatasetCard(existing)
    ours = {c["config_name"] for c in new.data.to_dict()["configs"]} | set(KNOWN_SUBSETS) | set(MIXTURES)
    old_data = old.data.to_dict()
    foreign = [c for c in old_data.get("configs") or [] if c.get("config_name") not in ours]
    configs = new.data.to_dict()["configs"]
    if any(c.get("default") for c in foreign):
        for config in configs:
            config.pop("default", None)
    infos = old_data.get("dataset_info") or []
    infos = [infos] if isinstance(infos, dict) else infos
    foreign_names = {c["config_name"] for c in foreign}
    new.data.configs = configs + foreign
    new.data.dataset_info = (new.data.to_dict().get("dataset_info") or []) + [
        i for i in infos if i.get("config_name") in foreign_names]
    for key, value in old_data.items():  # the card's own metadata: ours only where it has none
        if key not in ("configs", "dataset_info") and key not in new.data.to_dict():
            new.data[key] = value
    sections, current = [], []
    for line in old.text.splitlines(keepends=True):
        if line.startswith("# ") and current:
            sections.append("".join(current))
            current = []
        current.append(line)
    sections.append("".join(current))
    kept = [section for section in sections if section.strip() and not section.startswith(CARD_TITLE)]
    if kept:
        new.text = new.text.rstrip() + "\n\n" + "\n".join(section.rstrip() + "\n" for section in kept)
    return str(new)


def write_dataset_card(root: DataFolderLike, subsets: dict[str, str] | None = None, path_hint: str | None = None,
                       accounting: dict | None = None) -> str:
    """Write ``root/README.md`` (see ``render_card``), keeping configs and sections other stages added; returns
    its text."""
    folder = get_datafolder(root)
    text = render_card(folder, subsets, path_hint, accounting)
    if folder.exists("README.md"):
        with folder.open("README.md", "rt") as handle:
            text = _merge_existing(text, handle.read())
    with atomic_write(folder, "README.md", "wt") as handle:  # the next stage merges into it: never half-written
        handle.write(text)
    return text


def hub_data_files(config: str, repo: str = RELEASE_REPO) -> dict[str, list[str]]:
    """``data_files`` for ``load_dataset("webdataset", data_files=...)`` on a Hub repository in the release layout,
    for repositories without a card (e.g. the original release): ``hub_data_files("ccs")``."""
    names = MIXTURES.get(config, (config,))
    unknown = [n for n in names if n not in KNOWN_SUBSETS]
    if unknown:
        raise ValueError(f"unknown subset {unknown[0]!r}; known: {sorted(KNOWN_SUBSETS) + sorted(MIXTURES)}")
    return {"train": [f"hf://datasets/{repo}/{KNOWN_SUBSETS[n].folder}/{SHARD_GLOB}" for n in names]}
