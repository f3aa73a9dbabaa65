"""Reading the original inputs: prismatic checkpoints and run configs, timm or transformers SigLIP vision weights.

Torch files are read with ``torch.load(weights_only=True)`` (memory-mapped), never by running pickled code; a file
that cannot be read raises ``CheckpointError`` naming it. Kit-only, not copied into checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from .configuration_open_qwen2vl import OpenQwen2VLConfig
from .conversion_errors import CheckpointError, format_keys
from .prismatic_layout import timm_vision_to_hf


# The fixed part of a zip local file header ("PK\x03\x04" ... name length, extra length).
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_SCAN_BLOCK = 1 << 24  # 16 MiB reads: checkpoints are gigabytes


class _Member(NamedTuple):
    start: int  # offset of the member's stored bytes in the file
    end: int
    name: str
    crc: int


def _stored_members(path: Path) -> list[_Member]:
    """Where each member's bytes lie in a zip-format torch file, sorted by offset, for the CRC pass.

    torch writes members uncompressed; an archive with compressed members (re-zipped by hand) is checked with
    ``zipfile.testzip`` here instead and contributes no spans. Returns [] for a file that is not a zip.
    """
    if not zipfile.is_zipfile(path):
        return []  # the legacy (pre-1.6) torch format has no checksums
    members = []
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as handle:
            infos = archive.infolist()
            if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
                bad = archive.testzip()
                if bad is not None:
                    raise CheckpointError(f"{path} is damaged: zip member {bad!r} fails its CRC-32 check")
                return []
            for info in infos:
                handle.seek(info.header_offset)
                header = handle.read(_LOCAL_HEADER.size)
                if len(header) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != b"PK\x03\x04":
                    raise CheckpointError(f"{path} is damaged: zip member {info.filename!r} has no valid header")
                _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
                if handle.read(name_length) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800
                                                                         else "cp437"):
                    raise CheckpointError(f"{path} is damaged: zip member {info.filename!r} has a corrupt header")
                start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
                members.append(_Member(start, start + info.compress_size, info.filename, info.CRC))
    except CheckpointError:
        raise
    except Exception as error:  # BadZipFile, EOFError, struct.error... depending on where the damage is
        raise CheckpointError(f"{path} is a damaged zip archive ({type(error).__name__}: {error})") from error
    return sorted(members)


def scan_checkpoint_file(path: str | Path, *, sha256: bool = True) -> str | None:
    """Read ``path`` once, front to back: check every zip member's CRC-32 and, if asked, return the sha256 hex.

    ``torch.load`` ignores the CRCs, so bytes damaged inside a tensor record would load as changed weights; this
    raises ``CheckpointError`` naming the file and the member instead. Legacy (non-zip) torch files are only hashed.
    Returns None when ``sha256`` is False.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    members = _stored_members(path)
    digest = hashlib.sha256() if sha256 else None
    crc, current, position = 0, 0, 0  # running CRC of members[current], which may span several blocks
    with path.open("rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, leave=False,
                                          desc=f"{'sha256' if sha256 else 'verify'} {path.name}") as bar:
        for block in iter(lambda: handle.read(_SCAN_BLOCK), b""):
            if digest is not None:
                digest.update(block)
            view, end = memoryview(block), position + len(block)
            while current < len(members) and members[current].start <= end:
                member = members[current]
                low, high = max(member.start, position), min(member.end, end)
                if low < high:
                    crc = zlib.crc32(view[low - position : high - position], crc)
                if member.end > end:
                    break  # continues in the next block
                if crc != member.crc:
                    raise CheckpointError(f"{path} is damaged: zip member {member.name!r} fails its CRC-32 check "
                                          "(its bytes changed after it was written); re-download or re-copy it")
                crc, current = 0, current + 1
            position = end
            bar.update(len(block))
    if current < len(members):
        raise CheckpointError(f"{path} is truncated: zip member {members[current].name!r} ends past the end of file")
    return digest.hexdigest() if digest is not None else None


def load_torch_file(path: str | Path, *, verify: bool = True) -> dict:
    """``torch.load`` with ``weights_only=True`` (memory-mapped for zip-format files), with errors naming the file.

    ``verify`` first checks the zip members' CRC-32 (``scan_checkpoint_file``); pass False when the caller already
    did. Raises ``FileNotFoundError`` for a missing path and ``CheckpointError`` for a damaged file, a file that is
    not a PyTorch checkpoint or whose pickle would need to run code (custom classes, functions).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if verify:
        scan_checkpoint_file(path, sha256=False)
    try:
        # mmap keeps tensors on disk until touched; it needs the zip format (the default since torch 1.6).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, KeyError... depending on the bytes
        message = str(error)
        unsupported = re.search(r"Unsupported global: (?:GLOBAL )?([^\s]+)", message)
        code = [unsupported.group(1)] if unsupported else _pickle_globals(path)
        if code:
            raise CheckpointError(
                f"{path}: refusing to load: its pickle needs code execution ({', '.join(code[:5])}). Only plain "
                "tensor checkpoints are read (torch.load(weights_only=True)); re-save the state dicts as plain tensors."
            ) from error
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
        detail = detail.group(1).strip() if detail else (message.splitlines()[0] if message else "")
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {detail})"
        ) from error


def _pickle_globals(path: Path) -> list[str]:
    """Names a pickle would import (GLOBAL / STACK_GLOBAL), read with pickletools without running anything.

    Looks at a plain pickle file or the ``data.pkl`` of a zip checkpoint; returns [] when the bytes are no pickle.
    """
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(names[0]) if names else b""
        else:
            data = path.read_bytes()
        found, strings = [], []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
        return found
    except Exception:  # not a pickle stream: the caller reports an unreadable file
        return []


def load_prismatic_checkpoint(path: str | Path, *, verify: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """The ``["model"]`` dict of a prismatic checkpoint: ``{"projector", "llm_backbone", "vision_backbone"?}``.

    A dict holding those groups directly (no ``"model"`` wrapper) is accepted too. ``verify``: see
    ``load_torch_file``.
    """
    checkpoint = load_torch_file(path, verify=verify)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'model' entry, got {type(checkpoint).__name__}")
    original = checkpoint.get("model", checkpoint)
    if not isinstance(original, dict):
        raise CheckpointError(
            f"{path}: checkpoint['model'] must be a dict of state dicts, got {type(original).__name__}"
        )
    validate_original_groups(original, source=str(path))
    return original


def validate_original_groups(original: Mapping, source: str = "checkpoint") -> None:
    """Require ``projector`` and ``llm_backbone`` (and nothing unknown), each a mapping of tensors."""
    missing = [group for group in ("projector", "llm_backbone") if group not in original]
    if missing:
        raise CheckpointError(
            f"{source}: missing {' and '.join(repr(m) for m in missing)} in checkpoint['model'] (found keys: "
            f"{sorted(map(str, original))}); a prismatic checkpoint holds 'projector', 'llm_backbone' and optionally "
            "'vision_backbone'"
        )
    unknown = sorted(set(map(str, original)) - {"projector", "llm_backbone", "vision_backbone"})
    if unknown:
        raise CheckpointError(f"{source}: unknown checkpoint['model'] entries {unknown}")
    for group, state in original.items():
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"{source}: checkpoint['model'][{group!r}] is a {type(state).__name__}, not a state dict"
            )
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{source}: {group}/{key} is a {type(value).__name__}, not a tensor")


def read_prismatic_run_file(path: str | Path) -> tuple[Path, dict]:
    """A prismatic run's ``config.json`` (or the folder holding it): its path and the JSON object with a ``model``
    object in it; ``CheckpointError`` otherwise (with a hint when it is a transformers config.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"prismatic run config (--config) not found: {path}") from None
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{path} is not a readable JSON file: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        hint = " (that is a transformers config.json)" if isinstance(data, dict) and "model_type" in data else ""
        raise CheckpointError(
            f"{path} is not a prismatic run config: it needs a 'model' object (vision_backbone_id, llm_backbone_id, "
            f"...){hint}; pass the original run's config.json with --config"
        )
    return path, data


def read_prismatic_run_config(path: str | Path) -> dict:
    """The ``model`` section of a prismatic run's ``config.json`` (a folder holding it is accepted too)."""
    path, data = read_prismatic_run_file(path)
    if "arch_specifier" not in data["model"]:
        raise CheckpointError(f"{path}: expected a prismatic run config with model.arch_specifier")
    return data["model"]


def _strip_timm_prefix(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Keys of the one timm ViT inside ``state`` (prismatic ``featurizer.``, open_clip ``visual.trunk.``, bare...)."""
    marker = "patch_embed.proj.weight"
    prefixes = sorted({key[: -len(marker)] for key in state if key.endswith(marker)})
    if len(prefixes) != 1:
        raise CheckpointError(
            f"{source}: expected exactly one timm ViT (a '...{marker}' key), found prefixes {prefixes or 'none'}"
        )
    prefix = prefixes[0]
    return {key[len(prefix) :]: tensor for key, tensor in state.items() if key.startswith(prefix)}


def load_timm_vision_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A timm SigLIP state dict from ``.safetensors`` or a torch file, converted to SiglipVisionModel keys."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    else:
        state = load_torch_file(path)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    converted = timm_vision_to_hf(_strip_timm_prefix(state, str(path)))
    if converted.unknown:
        raise CheckpointError(
            f"{path}: timm keys without an equivalent in the vision tower: {format_keys(converted.unknown)}"
        )
    return converted.tensors


def load_hf_siglip_vision(source: str | Path, config: OpenQwen2VLConfig) -> dict[str, torch.Tensor]:
    """SiglipVisionModel weights from a transformers SigLIP folder or hub id (full SiglipModel checkpoints work too).

    The architecture must match ``config.vision_config``; the source's activation is ignored because the kit keeps
    the original's exact GELU (HF SigLIP checkpoints declare the tanh approximation).
    """
    from transformers import SiglipVisionModel

    try:
        model, info = SiglipVisionModel.from_pretrained(str(source), dtype="auto", output_loading_info=True)
    except (OSError, ValueError) as error:  # not found offline / on the hub, or not a SigLIP checkpoint
        raise CheckpointError(f"cannot load SigLIP vision weights from {str(source)!r}: {error}") from error
    if info["missing_keys"]:
        raise CheckpointError(
            f"{source}: the SigLIP checkpoint lacks vision weights {format_keys(sorted(info['missing_keys']))}; "
            "refusing to use randomly initialised vision weights"
        )
    ours, theirs = config.vision_config, model.config
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size")
    mismatched = {f: (getattr(theirs, f), getattr(ours, f)) for f in fields if getattr(theirs, f) != getattr(ours, f)}
    if mismatched:
        raise CheckpointError(
            f"{source}: SigLIP architecture differs from the model config (theirs, ours): {mismatched}"
        )
    return dict(model.state_dict())


def load_vision_weights(source: str | Path, config: OpenQwen2VLConfig) -> dict[str, torch.Tensor]:
    """Vision tower weights (SiglipVisionModel keys) from a timm file, or a transformers SigLIP folder / hub id."""
    if Path(source).is_file():
        return load_timm_vision_file(source)
    return load_hf_siglip_vision(source, config)
