"""Data stages for Open-Qwen2VL: raw WebDataset shards -> scores -> selection -> resharded and packed corpora.

Every stage is a datatrove pipeline (LocalPipelineExecutor by default; Slurm or Ray at scale) and every corpus it
writes carries a dataset card so ``datasets.load_dataset(folder, "<config>")`` reads it.
"""
