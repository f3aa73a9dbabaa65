"""Load the kit's `evaluate` metric modules by local path (no Hub access, so evaluation runs offline)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def metric_path(name: str) -> Path:
    """Folder of the metric ``name`` (it holds ``<name>.py``); raises FileNotFoundError listing the shipped ones."""
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        known = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise FileNotFoundError(f"no metric {name!r} shipped in the kit; known metrics: {', '.join(known)}")
    return folder


@lru_cache(maxsize=None)
def load_metric(name: str, config_name: str | None = None):
    """``evaluate.load`` of a shipped metric by path; cached per (name, configuration)."""
    import evaluate

    return evaluate.load(str(metric_path(name)), config_name)


def compute(name: str, config_name: str | None, predictions: list, references: list, **kwargs) -> dict:
    """Run one metric; an empty input gives an empty result instead of evaluate's IndexError."""
    if not predictions:
        return {"accuracy": None, "parsed": [], "correct": []}
    return load_metric(name, config_name).compute(predictions=predictions, references=references, **kwargs)
