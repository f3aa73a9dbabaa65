"""Shared helpers for bench/ scripts: machine description and BENCHMARKS.md assembly.

Each benchmark prints its table and stores it as ``bench/results/<name>.md``; BENCHMARKS.md is rebuilt from all
stored results so benchmarks written by different scripts never overwrite each other.
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HEADER = """# Benchmarks

Every table below is produced by a script in `bench/` that measures the kit and its baseline side by side in one
run, and prints the same table. Re-run one with `.venv/bin/python bench/<script>.py`; `make bench` runs them all.
Figures are ratios on the machine named in each section; absolute times vary between machines.
"""


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # The vector unit decides CPU figures as much as the model name does (bf16 is native only with AVX512/AMX).
    from recipes.cpu_runtime import cpu_has_native_bf16

    cpu += f" ({torch.backends.cpu.get_cpu_capability()}, bf16 {'native' if cpu_has_native_bf16() else 'emulated'})"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only, {os.cpu_count()} cores"
    return f"{cpu}; {device}; Python {sys.version.split()[0]}, torch {torch.__version__}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, title: str, body: str, command: str | None = None) -> Path:
    """Store one benchmark's section and rebuild BENCHMARKS.md; returns the section's path. ``command``: how the
    section was produced, when not ``bench/<name>.py``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    command = command or f"bench/{name}.py"
    section = f"## {title}\n\nMachine: {machine_description()}. Run: {stamp}, `{command}`.\n\n{body.strip()}\n"
    path = RESULTS / f"{name}.md"
    path.write_text(section, encoding="utf-8")
    sections = [p.read_text(encoding="utf-8") for p in sorted(RESULTS.glob("*.md"))]
    (ROOT / "BENCHMARKS.md").write_text(HEADER + "\n" + "\n".join(sections), encoding="utf-8")
    return path
