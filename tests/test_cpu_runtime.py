"""CPU training settings: freed memory is kept for reuse (glibc), and emulated bf16 is reported."""

import ctypes
import ctypes.util
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from recipes import cpu_runtime

ROOT = Path(__file__).resolve().parent.parent

# Allocates and frees a 64 MiB tensor; glibc's own counters say where it came from and what stayed afterwards.
ALLOCATOR_PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, json, sys
    import torch
    from recipes.cpu_runtime import keep_freed_memory_for_reuse

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    applied = keep_freed_memory_for_reuse() if sys.argv[1] == "kit" else None
    before = libc.mallinfo2()
    tensor = torch.ones(16 << 20)  # 64 MiB of float32
    during = libc.mallinfo2()
    del tensor
    after = libc.mallinfo2()
    print(json.dumps({"applied": applied, "mapped": during.hblkhd - before.hblkhd,
                      "kept_free": after.fordblks - before.fordblks}))
""")


def _probe(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return name is not None and hasattr(ctypes.CDLL(name), "mallinfo2")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc >= 2.33 only")
def test_freed_large_tensors_stay_in_the_heap_for_the_next_step():
    mib = 1 << 20
    default = _probe("default")
    assert default["mapped"] >= 64 * mib  # glibc's default: a fresh mapping, returned to the kernel when freed
    assert default["kept_free"] < 8 * mib
    kit = _probe("kit")
    assert kit["applied"] is True
    assert kit["mapped"] == 0  # served from the heap...
    assert kit["kept_free"] >= 60 * mib  # ...and kept there once freed, so the next allocation faults no pages


@pytest.fixture
def allocator_calls(monkeypatch):
    """Keeps the test process' allocator as it is; records whether the kit asked to change it."""
    calls = []
    monkeypatch.setattr(cpu_runtime, "keep_freed_memory_for_reuse", lambda: calls.append(True) or True)
    return calls


def test_emulated_bf16_on_cpu_is_reported_with_the_fix(monkeypatch, caplog, allocator_calls):
    monkeypatch.setattr(cpu_runtime, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="recipes.cpu_runtime"):
        cpu_runtime.prepare_cpu_training(torch.device("cpu"), "bf16")
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "without native bf16" in warning.getMessage() and "--mixed_precision no" in warning.getMessage()
    assert allocator_calls == [True]


@pytest.mark.parametrize("precision, native", [("no", False), (None, False), ("bf16", True)])
def test_no_warning_where_bf16_is_not_asked_for_or_native(monkeypatch, caplog, allocator_calls, precision, native):
    monkeypatch.setattr(cpu_runtime, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.INFO, logger="recipes.cpu_runtime"):
        cpu_runtime.prepare_cpu_training(torch.device("cpu"), precision)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert allocator_calls == [True]


def test_an_fsdp_accelerate_config_on_cpu_is_reported_and_not_on_gpu(monkeypatch, caplog, allocator_calls):
    """`accelerate launch --config_file <fsdp yaml>` exports ACCELERATE_USE_FSDP; accelerate drops it on CPUs."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level(logging.INFO, logger="recipes.cpu_runtime"):
        cpu_runtime.prepare_cpu_training(torch.device("cpu"), "no")
        cpu_runtime.prepare_cpu_training(torch.device("cuda"), "no")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "asks for FSDP, but accelerate does not apply it on a CPU" in warning and "--cpu_fsdp true" in warning


def test_gpu_runs_keep_the_default_allocator(monkeypatch, caplog, allocator_calls):
    monkeypatch.setattr(cpu_runtime, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="recipes.cpu_runtime"):
        cpu_runtime.prepare_cpu_training(torch.device("cuda"), "bf16")
    assert allocator_calls == [] and not caplog.records


def test_fp16_on_cpu_is_refused_because_accelerate_applies_nothing_there(allocator_calls, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # The premise, checked on accelerate itself: its fp16 autocast on a CPU leaves products in fp32.
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    try:
        with accelerator.autocast():
            product = torch.ones(4, 4) @ torch.ones(4, 4)
        assert product.dtype == torch.float32 and accelerator.scaler is None
    finally:
        AcceleratorState._reset_state(True)
    with pytest.raises(ValueError, match="mixed_precision fp16 has no effect on a CPU"):
        cpu_runtime.prepare_cpu_training(torch.device("cpu"), "fp16")
    cpu_runtime.prepare_cpu_training(torch.device("cuda"), "fp16")  # a GPU applies it

    # Both recipes stop before loading anything.
    from recipes.sft import main as sft_main

    with pytest.raises(ValueError, match="mixed_precision fp16 has no effect on a CPU"):
        sft_main(["--output_dir", str(tmp_path / "sft"), "--init_from_preset", "tiny", "--dataset_name", "easy_vqa",
                  "--fp16", "true", "--bf16", "false", "--use_cpu", "true", "--report_to", "none"])
    from recipes.pretrain import main as pretrain_main

    try:
        with pytest.raises(ValueError, match="mixed_precision fp16 has no effect on a CPU"):
            pretrain_main(["--config", str(ROOT / "recipes" / "configs" / "pretrain_tiny.yaml"),
                           "--dataset_name_or_path", str(tmp_path / "none"), "--output_dir", str(tmp_path / "pre"),
                           "--mixed_precision", "fp16", "--report_to", "none"])
    finally:
        AcceleratorState._reset_state(True)
    assert not (tmp_path / "sft" / "easy_vqa_data").exists()  # SFT stopped before writing its data
