"""Datatrove pipeline steps of the data stages (compose them into your own datatrove pipelines too)."""

from .clip_score import ClipScorer
from .decode import DecodeImages
from .mlm_filter import MLMFilterScorer
from .reader import WebDatasetReader
from .reshard import ReshardWriter, plan_reshard
from .score_writer import ScoreWriter
from .select import SelectionFinalizer, ShardSelector

__all__ = [
    "ClipScorer",
    "DecodeImages",
    "MLMFilterScorer",
    "ReshardWriter",
    "ScoreWriter",
    "SelectionFinalizer",
    "ShardSelector",
    "WebDatasetReader",
    "plan_reshard",
]
