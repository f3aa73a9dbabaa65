"""Entry points users launch: pretrain.py, sft.py, eval.py, demo.py, release/ (see README)."""
