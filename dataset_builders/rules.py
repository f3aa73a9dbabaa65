"""Selection rules, evaluated column-wise on one shard's metadata table.

- ``TextRules``: empty, too short, too long, boilerplate captions.
- ``ImageRules``: minimum side, maximum aspect ratio.
- ``Expression``: a boolean rule over score columns, uid lists and earlier selections, e.g.
  ``"semantic_understanding_score >= 85 or dfn"`` (union), ``"clip_score >= 0.28 and not dfn"``,
  ``"top(clip_score, 0.3)"`` (the best 30% of the pool; the threshold is resolved over all shards first).
  Grammar: ``and``/``or``/``not``, comparisons (chainable), ``+ - * /``, numbers, names, ``top(name, fraction)``.
  Missing scores follow SQL's three-valued logic: a comparison on a missing value is *unknown*, ``unknown or True``
  is True, ``not unknown`` stays unknown, and a sample whose rule ends unknown is dropped as ``missing_score``
  (not as ``rule``), so "not scored" is never confused with "scored low".
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field

import numpy as np

# Captions that describe nothing (placeholder, file-name or stock-site boilerplate), matched on the whole caption.
DEFAULT_BOILERPLATE = (
    r"(image|photo|picture|img|dsc|dscn|dcim|screenshot|untitled)[\s_-]*\d*(\.(jpe?g|png|gif|webp))?",
    r"[\w-]+\.(jpe?g|png|gif|webp|bmp)",
    r"(no|without) (description|caption|title)( available)?",
    r"(image|photo|picture) (may )?(contain|not available|unavailable).*",
    r"(click|tap) (here )?to (enlarge|zoom|view).*",
    r".*(stock photo|stock image|royalty[- ]free|all rights reserved).*",
    r"(null|none|n/?a|nan|undefined|-+|\.+)",
    r"(thumbnail|placeholder|loading\.*|default image)",
)


@dataclass
class TextRules:
    """Caption rules; 0 disables a bound. Reasons: text_empty, text_too_short, text_too_long, text_boilerplate."""

    drop_empty: bool = True
    min_words: int = 0
    min_chars: int = 0
    max_chars: int = 0
    boilerplate: bool = False
    boilerplate_patterns: tuple[str, ...] = DEFAULT_BOILERPLATE

    def __post_init__(self):
        self._boilerplate = re.compile("|".join(f"(?:{p})" for p in self.boilerplate_patterns), re.IGNORECASE)

    def reason(self, caption: str) -> str | None:
        text = caption.strip()
        if not text:
            return "text_empty" if self.drop_empty else None
        if (self.min_chars and len(text) < self.min_chars) or (self.min_words and len(text.split()) < self.min_words):
            return "text_too_short"
        if self.max_chars and len(text) > self.max_chars:
            return "text_too_long"
        if self.boilerplate and self._boilerplate.fullmatch(text):
            return "text_boilerplate"
        return None


@dataclass
class ImageRules:
    """Image size rules; 0 disables a bound. Reasons: image_too_small, aspect_ratio."""

    min_side: int = 0
    max_aspect_ratio: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.min_side or self.max_aspect_ratio)

    def reasons(self, width: np.ndarray, height: np.ndarray) -> list[str | None]:
        width, height = np.asarray(width, dtype=float), np.asarray(height, dtype=float)
        short, long = np.minimum(width, height), np.maximum(width, height)
        small = short < self.min_side if self.min_side else np.zeros(len(width), bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            wide = (long / short > self.max_aspect_ratio) if self.max_aspect_ratio else np.zeros(len(width), bool)
        return ["image_too_small" if s else "aspect_ratio" if w else None for s, w in zip(small, wide)]


class RuleError(ValueError):
    """An invalid selection expression (syntax, unknown name, wrong type)."""


@dataclass
class Truth:
    """Kleene three-valued booleans: ``value`` is meaningful only where ``known``."""

    value: np.ndarray
    known: np.ndarray

    @classmethod
    def of(cls, value: np.ndarray, known: np.ndarray | None = None) -> "Truth":
        value = np.asarray(value, dtype=bool)
        known = np.ones_like(value) if known is None else np.asarray(known, dtype=bool)
        return cls(value & known, known)

    def __and__(self, other: "Truth") -> "Truth":
        false_a, false_b = self.known & ~self.value, other.known & ~other.value
        return Truth.of(self.value & other.value, (self.known & other.known) | false_a | false_b)

    def __or__(self, other: "Truth") -> "Truth":
        return Truth.of(self.value | other.value, (self.known & other.known) | self.value | other.value)

    def __invert__(self) -> "Truth":
        return Truth.of(~self.value, self.known)


_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclass
class Expression:
    """A parsed selection rule. ``names`` are the columns it reads; ``top_calls`` the (column, fraction) pairs whose
    thresholds must be supplied to ``evaluate`` (see ``resolve_top_threshold``)."""

    source: str
    tree: ast.Expression = field(init=False, repr=False)
    names: set[str] = field(init=False, default_factory=set)
    top_calls: list[tuple[str, float]] = field(init=False, default_factory=list)

    def __post_init__(self):
        try:
            self.tree = ast.parse(self.source, mode="eval")
        except SyntaxError as error:
            raise RuleError(f"invalid selection rule {self.source!r}: {error.msg}") from None
        self._check(self.tree.body)

    def _check(self, node) -> None:
        if isinstance(node, ast.BoolOp) or isinstance(node, ast.Compare):
            for child in (node.values if isinstance(node, ast.BoolOp) else [node.left, *node.comparators]):
                self._check(child)
            if isinstance(node, ast.Compare) and not all(type(op) in _COMPARE for op in node.ops):
                raise RuleError(f"unsupported comparison in {self.source!r}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            self._check(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.Name):
            self.names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):  # bool is an int too
            pass
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "top"
              and len(node.args) == 2 and not node.keywords and isinstance(node.args[0], ast.Name)
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, (int, float))):
            fraction = float(node.args[1].value)
            if not 0.0 < fraction <= 1.0:
                raise RuleError(f"top() fraction must be in (0, 1], got {fraction} in {self.source!r}")
            self.names.add(node.args[0].id)
            self.top_calls.append((node.args[0].id, fraction))
        else:
            raise RuleError(f"unsupported element {ast.dump(node)[:60]} in selection rule {self.source!r}; "
                            "use and/or/not, comparisons, + - * /, numbers, names and top(name, fraction)")

    def check_types(self, conditions: set[str] = frozenset()) -> None:
        """Raise the ``RuleError`` that ``evaluate`` would (a number where a condition is expected, or the reverse)
        without any data, by evaluating on zero rows: ``conditions`` are the names that are true/false (uid lists,
        selections), every other name a number. Run before a stage records its settings: a shard with no samples
        never evaluates the rule."""
        columns = {name: np.zeros(0, dtype=bool if name in conditions else float) for name in self.names}
        self.evaluate(columns, 0, {top_key(name, fraction): 0.0 for name, fraction in self.top_calls})

    def evaluate(self, columns: dict[str, np.ndarray], size: int, thresholds: dict[str, float] | None = None) -> Truth:
        """Evaluate on ``size`` rows. Numeric columns use NaN for missing; bool columns are always known.
        ``thresholds`` maps ``top_key(column, fraction)`` to the resolved threshold of each ``top()``."""
        result = self._eval(self.tree.body, columns, size, thresholds or {})
        if not isinstance(result, Truth):
            raise RuleError(f"selection rule {self.source!r} is a number, not a condition")
        return result

    def _eval(self, node, columns, size, thresholds):
        if isinstance(node, ast.BoolOp):
            parts = [self._truth(self._eval(v, columns, size, thresholds)) for v in node.values]
            out = parts[0]
            for part in parts[1:]:
                out = out & part if isinstance(node.op, ast.And) else out | part
            return out
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, columns, size, thresholds)
            if isinstance(node.op, ast.Not):
                return ~self._truth(value)
            return -self._number(value)
        if isinstance(node, ast.Compare):
            out = None
            left = self._number(self._eval(node.left, columns, size, thresholds))
            for op, comparator in zip(node.ops, node.comparators):
                right = self._number(self._eval(comparator, columns, size, thresholds))
                known = ~(np.isnan(left) | np.isnan(right))
                with np.errstate(invalid="ignore"):
                    part = Truth.of(_COMPARE[type(op)](left, right), known)
                out = part if out is None else out & part
                left = right
            return out
        if isinstance(node, ast.BinOp):
            left = self._number(self._eval(node.left, columns, size, thresholds))
            right = self._number(self._eval(node.right, columns, size, thresholds))
            with np.errstate(divide="ignore", invalid="ignore"):
                return _ARITH[type(node.op)](left, right)
        if isinstance(node, ast.Name):
            if node.id not in columns:
                raise RuleError(f"unknown name {node.id!r} in selection rule {self.source!r}; "
                                f"available: {sorted(columns)}")
            value = np.asarray(columns[node.id])
            return Truth.of(value) if value.dtype == bool else value.astype(float)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                return Truth.of(np.full(size, node.value))
            return np.full(size, float(node.value))
        if isinstance(node, ast.Call):  # top(name, fraction), validated in _check
            name, fraction = node.args[0].id, float(node.args[1].value)
            if top_key(name, fraction) not in thresholds:
                raise RuleError(f"no threshold resolved for {top_key(name, fraction)}")
            values = self._number(self._eval(node.args[0], columns, size, thresholds))
            with np.errstate(invalid="ignore"):
                return Truth.of(values >= thresholds[top_key(name, fraction)], ~np.isnan(values))
        raise RuleError(f"cannot evaluate {ast.dump(node)[:60]}")

    def _truth(self, value) -> Truth:
        if not isinstance(value, Truth):
            raise RuleError(f"selection rule {self.source!r} uses a number where a condition is expected")
        return value

    def _number(self, value) -> np.ndarray:
        if isinstance(value, Truth):
            raise RuleError(f"selection rule {self.source!r} compares or adds a condition, not a number")
        return value


def top_key(column: str, fraction: float) -> str:
    """How a resolved ``top(column, fraction)`` threshold is named (json-friendly)."""
    return f"top({column}, {float(fraction)})"


def resolve_top_threshold(values: np.ndarray, fraction: float) -> float:
    """Threshold keeping the best ``fraction`` of scored values: the ``max(1, int(n * fraction))``-th largest value
    (ties at the threshold are kept, as with DataComp's ``--fraction``); NaN (unscored) values are ignored."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("inf")
    rank = min(max(int(len(values) * fraction), 1), len(values))
    return float(np.partition(values, len(values) - rank)[len(values) - rank])
