"""Evaluation of Open-Qwen2VL models: the paper's benchmarks with the original harness's prompts and scoring.

Entry points: the CLI ``recipes/eval.py``; ``evaluate_model`` for an already loaded model (e.g. inside a training
run); the lmms-eval plugin in ``lmms_eval_plugin`` (registered by ``lmms_eval_manifest``). Scoring rules live in
``evaluate`` metric modules under ``metrics/`` and load by local path, so everything runs offline once data is local.
"""

from .generation import ORIGINAL_MAX_NEW_TOKENS, ORIGINAL_STOP_TOKEN_IDS, Predictor
from .registry import Benchmark, Scores, UnknownBenchmarkError, get_benchmark, known_benchmarks
from .runner import BenchmarkResult, EvalOptions, evaluate_benchmark, evaluate_model
from .samples import DropLog, EvalSample, SampleError

__all__ = [
    "ORIGINAL_MAX_NEW_TOKENS",
    "ORIGINAL_STOP_TOKEN_IDS",
    "Benchmark",
    "BenchmarkResult",
    "DropLog",
    "EvalOptions",
    "EvalSample",
    "Predictor",
    "SampleError",
    "Scores",
    "UnknownBenchmarkError",
    "evaluate_benchmark",
    "evaluate_model",
    "get_benchmark",
    "known_benchmarks",
]
