"""Evaluation of Open-Qwen2VL models: the paper's benchmarks with the original harness's prompts and scoring.

Entry points: the CLI ``recipes/eval.py``; ``evaluate_model`` for an already loaded model (e.g. inside a training
run); the lmms-eval plugin in ``lmms_eval_plugin`` (registered by ``lmms_eval_manifest``). Scoring rules live in
``evaluate`` metric modules under ``metrics/`` and load by local path, so everything runs offline once data is local.
Names are imported lazily, so listing benchmarks or validating names does not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "ORIGINAL_MAX_NEW_TOKENS": "original_settings",
    "ORIGINAL_STOP_TOKEN_IDS": "original_settings",
    "Predictor": "generation",
    "Benchmark": "registry",
    "Scores": "registry",
    "UnknownBenchmarkError": "registry",
    "get_benchmark": "registry",
    "known_benchmarks": "registry",
    "BenchmarkResult": "runner",
    "EvalOptions": "runner",
    "evaluate_benchmark": "runner",
    "evaluate_model": "runner",
    "DropLog": "samples",
    "EvalSample": "samples",
    "SampleError": "samples",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
