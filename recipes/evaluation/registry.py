"""The benchmark interface and the registry of known benchmarks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from .samples import EvalSample

GENERATE = "generate"  # greedy generation, scored from the text
LETTER_PROBS = "letter_probs"  # first-step probabilities of option letters (AI2D in the original harness)
CANDIDATES = "candidates"  # log-likelihood of each candidate answer


@dataclass
class Scores:
    """A benchmark's scores.

    ``original`` holds the Open-Qwen2VL harness's rules, ``strict`` the benchmark's own evaluator's rules (None when
    the benchmark has no second rule); each has at least ``accuracy`` (a fraction). ``per_sample`` has one dict per
    sample with ``parsed``/``correct`` (original rule) and ``parsed_strict``/``correct_strict``. ``extra`` holds
    benchmark-specific numbers (baselines, per-category results ...).
    """

    original: dict
    strict: dict | None
    per_sample: list[dict]
    extra: dict = field(default_factory=dict)


class Benchmark(ABC):
    """One benchmark: where its data lives, how a row becomes an ``EvalSample``, how outputs are scored.

    Subclasses set the class attributes and implement ``to_sample`` and ``score``.
    """

    name: str
    title: str
    data_name: str | None = None  # folder under --data-dir; None = ``name`` (variants of one dataset share it)
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "test"
    method: str = GENERATE
    # (column, predicate): rows kept before --limit applies, read without decoding images (e.g. SEED image questions)
    row_filter: tuple[str, Callable] | None = None
    # letters whose first-step probabilities are read, for LETTER_PROBS
    probability_letters: tuple[str, ...] = ()
    # columns the rows must have (checked once per run, so a wrong --data-dir fails with a clear message)
    required_columns: tuple[str, ...] = ()

    def check_columns(self, column_names, where: str) -> None:
        missing = [c for c in self.required_columns if c not in column_names]
        if missing:
            raise ValueError(
                f"{self.name}: the data from {where} lacks column(s) {missing}; expected the schema of "
                f"{self.hub_id or 'the benchmark'} (columns include {list(self.required_columns)})"
            )

    def row_id(self, row: dict, index: int) -> str:
        """A stable id for reports; the dataset's own id when it has one."""
        for key in ("question_id", "index", "id", "pid"):
            if row.get(key) is not None:
                return str(row[key])
        return str(index)

    @abstractmethod
    def to_sample(self, row: dict, index: int) -> EvalSample:
        """Build the sample; raise ``SampleError`` for a row that cannot be evaluated."""

    def check_samples(self, samples: list[EvalSample]) -> None:
        """Raise (ValueError) when the samples cannot be scored together; run on every process before ``score``,
        so that all of them fail the benchmark alike. Nothing to check by default."""

    @abstractmethod
    def score(self, samples: list[EvalSample], outputs: list) -> Scores:
        """Score ``outputs`` (texts, letter probabilities or candidate log-likelihoods, per ``method``)."""

    def candidates(self, sample: EvalSample, prompt_format: str) -> list[str]:
        """Continuations scored for CANDIDATES benchmarks."""
        raise NotImplementedError(f"{self.name} does not score candidate answers")

    def load(self, data_dir=None):
        """The evaluation split as a ``datasets.Dataset`` (see ``loading.load_split``)."""
        from .loading import load_split

        return load_split(self, data_dir)


_REGISTRY: dict[str, type[Benchmark]] = {}


class UnknownBenchmarkError(KeyError):
    """Raised for a benchmark name the kit does not know; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator adding a benchmark to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"benchmark name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def known_benchmarks() -> list[str]:
    from . import benchmarks  # noqa: F401  (importing registers them)

    return sorted(_REGISTRY)


def get_benchmark(name: str) -> Benchmark:
    """A fresh instance of the benchmark ``name``; ``UnknownBenchmarkError`` lists the known names."""
    known = known_benchmarks()
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise UnknownBenchmarkError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(known)}")
    return _REGISTRY[key]()


def parse_benchmark_list(names: str | list[str]) -> list[Benchmark]:
    """Benchmarks from a comma-separated string or a list, in order, without duplicates."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not names:
        raise UnknownBenchmarkError(f"no benchmark given; known benchmarks: {', '.join(known_benchmarks())}")
    chosen = []
    for name in names:
        benchmark = get_benchmark(name)
        if benchmark.name not in [b.name for b in chosen]:
            chosen.append(benchmark)
    return chosen
