"""Benchmark: converting a real-size (2.0B parameters) Open-Qwen2VL prismatic checkpoint on CPU.

A random checkpoint with the released architecture and the original key layout (vision_backbone included, bf16) is
built in a child process and saved with torch.save. Then, each in its own child process so peak RSS is its own:
- kit: ``convert_checkpoint`` (memory-mapped ``torch.load(weights_only=True)``, tensors renamed/split as views,
  written by ``save_pretrained(state_dict=...)`` from a meta-device model, sha256 of the source for the card);
- baseline: what a typical conversion script does: load the whole checkpoint into RAM, instantiate the HF model,
  ``load_state_dict``, ``save_pretrained``.
Target: kit peak RSS <= 1.5x the checkpoint's size. Run: ``.venv/bin/python bench/convert_2b.py [--skip-baseline]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 1024**3
RUN_CONFIG = {
    "model": {"model_id": "Open-Qwen2VL-bench", "arch_specifier": "full-align+729-avgpool",
              "vision_backbone_id": "siglip-vit-so400m-384px", "llm_backbone_id": "qwen2.5-1.5b-instruct",
              "image_resize_strategy": "resize-naive", "llm_max_length": 4096},
    "mount_path": "Qwen",
}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _released_config():
    from modeling_open_qwen2vl import OpenQwen2VLConfig
    from modeling_open_qwen2vl.conversion_config import derive_config

    return derive_config(OpenQwen2VLConfig.open_qwen2vl_2b(num_image_tokens=729), vision_use_head=True)


def child_build(workdir: Path) -> dict:
    """The original-layout checkpoint, generated tensor by tensor in bf16 from the architecture's shapes."""
    import torch

    from modeling_open_qwen2vl.conversion_config import expected_state_dict_shapes
    from modeling_open_qwen2vl.weight_mapping import convert_to_prismatic

    config = _released_config()
    shapes = expected_state_dict_shapes(config)
    meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    meta["lm_head.weight"] = meta["model.language_model.embed_tokens.weight"]  # tied, as in the released model
    layout = convert_to_prismatic(meta, config)
    generator = torch.Generator().manual_seed(0)
    made: dict[int, torch.Tensor] = {}
    checkpoint = {}
    for group, state in layout.items():
        checkpoint[group] = {}
        for key, tensor in state.items():
            if id(tensor) not in made:
                made[id(tensor)] = torch.randn(tensor.shape, generator=generator, dtype=torch.bfloat16)
            checkpoint[group][key] = made[id(tensor)]
    path = workdir / "run" / "checkpoints" / "latest-checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": checkpoint}, path)
    (workdir / "run" / "config.json").write_text(json.dumps(RUN_CONFIG))
    params = sum(t.numel() for t in made.values())
    return {"params": params, "bytes": path.stat().st_size}


def child_kit(workdir: Path) -> dict:
    from modeling_open_qwen2vl.hf_folder import convert_checkpoint

    start = time.perf_counter()
    convert_checkpoint(workdir / "run", workdir / "out_kit")
    return {"seconds": time.perf_counter() - start, "peak_rss": _peak_rss_bytes()}


def child_baseline(workdir: Path) -> dict:
    import torch

    from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
    from modeling_open_qwen2vl.weight_mapping import convert_state_dict

    start = time.perf_counter()
    original = torch.load(workdir / "run" / "checkpoints" / "latest-checkpoint.pt", weights_only=True)["model"]
    config = _released_config()
    state = convert_state_dict(original, config)
    model = OpenQwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(workdir / "out_baseline")
    return {"seconds": time.perf_counter() - start, "peak_rss": _peak_rss_bytes()}


def _run_child(mode: str, workdir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, "--child", mode, "--workdir", str(workdir)],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_output(workdir: Path, folder: str) -> int:
    """Spot-check the converted tensors against the checkpoint (a fused qkv split, the projector, the LM head)."""
    import torch
    from safetensors import safe_open

    original = torch.load(workdir / "run" / "checkpoints" / "latest-checkpoint.pt", weights_only=True,
                          mmap=True)["model"]
    index = json.loads((workdir / folder / "model.safetensors.index.json").read_text())["weight_map"] \
        if (workdir / folder / "model.safetensors.index.json").exists() else None

    def read(key):
        name = index[key] if index else "model.safetensors"
        with safe_open(workdir / folder / name, "pt") as handle:
            return handle.get_tensor(key)

    qkv = original["vision_backbone"]["featurizer.blocks.7.attn.qkv.weight"]
    assert torch.equal(read("model.vision_tower.encoder.layers.7.self_attn.k_proj.weight"), qkv[1152:2304])
    assert torch.equal(read("model.multi_modal_projector.linear_2.bias"), original["projector"]["mlp_projector.2.bias"])
    assert torch.equal(read("model.language_model.embed_tokens.weight"),
                       original["llm_backbone"]["llm.lm_head.weight"])
    return len(set(index.values())) if index else 1


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["build", "kit", "baseline"])
    parser.add_argument("--workdir")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    if args.child:
        result = {"build": child_build, "kit": child_kit, "baseline": child_baseline}[args.child](Path(args.workdir))
        print(json.dumps(result))
        return

    from bench._common import markdown_table, write_result

    workdir = Path(tempfile.mkdtemp(prefix="convert_2b_"))
    try:
        start = time.perf_counter()
        built = _run_child("build", workdir)
        print(f"built {built['params'] / 1e9:.3f}B parameters, {built['bytes'] / GIB:.2f} GiB "
              f"in {time.perf_counter() - start:.0f}s")
        size = built["bytes"]
        rows = []
        kit = _run_child("kit", workdir)
        shards = _check_output(workdir, "out_kit")
        shutil.rmtree(workdir / "out_kit")
        rows.append(["kit: mmap + renamed views + save_pretrained(state_dict=)", f"{kit['seconds']:.1f}",
                     f"{kit['peak_rss'] / GIB:.2f}", f"{kit['peak_rss'] / size:.2f}x"])
        baseline_note = ""
        if args.skip_baseline:
            baseline_note = "Baseline skipped (--skip-baseline)."
        elif _available_memory() < 3 * size + 2 * GIB:
            baseline_note = (f"Baseline skipped: {_available_memory() / GIB:.1f} GiB available, it needs about "
                             f"{(3 * size + 2 * GIB) / GIB:.1f} GiB.")
        else:
            base = _run_child("baseline", workdir)
            _check_output(workdir, "out_baseline")
            rows.append(["baseline: load all + build model + load_state_dict + save_pretrained",
                         f"{base['seconds']:.1f}", f"{base['peak_rss'] / GIB:.2f}", f"{base['peak_rss'] / size:.2f}x"])
        table = markdown_table(["conversion", "wall time (s)", "peak RSS (GiB)", "peak RSS / checkpoint"], rows)
        body = (
            f"Random checkpoint with the released architecture (SigLIP-SO400M incl. pooling head + projector + "
            f"Qwen2.5-1.5B, tied embeddings): {built['params'] / 1e9:.3f}B parameters in bf16, original key layout "
            f"with `vision_backbone`, {size / GIB:.2f} GiB on disk. Each conversion runs in its own process "
            f"(OMP_NUM_THREADS=1); peak RSS is that process's `ru_maxrss` (includes the memory-mapped checkpoint pages "
            f"it touched). The kit's time includes hashing the checkpoint for the model card; its output "
            f"({shards} safetensors file(s), 5GB shards) is spot-checked against the checkpoint.\n\n{table}\n\n"
            f"Target: kit peak RSS <= 1.5x the checkpoint size: "
            f"**{'met' if kit['peak_rss'] <= 1.5 * size else 'NOT met'}** ({kit['peak_rss'] / size:.2f}x). "
            f"{baseline_note}"
        )
        print(body)
        write_result("convert_2b", "Converter: 2B prismatic checkpoint -> transformers folder (CPU)", body)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
