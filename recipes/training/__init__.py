"""Building blocks of the pretraining recipe (``recipes/pretrain.py``); the SFT recipe reuses the generic ones.

- ``arguments``: the three config dataclasses, YAML + command-line parsing (TRL's parser), validation
- ``model_setup``: model/processor from a kit checkpoint, pretrained parts or a preset; stage freezing
- ``optim``: AdamW parameter groups (no decay on biases and norms) and the schedule
- ``data``: packed corpus -> per-process micro-batches with an exactly resumable position
- ``loss``: packed causal-LM loss, token-weighted or the original's micro-batch mean
- ``checkpointing``: sharded (DCP) checkpoints with optimizer, scheduler, RNG and data position; final HF folder
- ``flops``: model FLOPs and MFU; ``fsdp``: the FSDP2 wrap plan for CPU/torchrun; ``run_logs``: metrics.jsonl
- ``trainer``: the loop
- ``toy_corpus``: a small real packed caption corpus from easy-vqa (tests, benchmark, CPU demo runs)
"""
