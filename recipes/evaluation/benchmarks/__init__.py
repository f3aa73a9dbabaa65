"""Benchmark definitions; importing this package registers them (see ``registry.known_benchmarks``)."""

from . import ai2d, easy_vqa, mathvista, mmbench, mmmu, mmstar, pope, seedbench, textvqa  # noqa: F401
