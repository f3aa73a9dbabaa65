"""Open-Qwen2VL pretraining: packed image-caption data, accelerate (single process to multi-node FSDP2).

    accelerate launch --config_file recipes/accelerate/fsdp2_8gpu.yaml recipes/pretrain.py \
        --config recipes/configs/pretrain_open_qwen2vl_2b.yaml [--any_key value ...]

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain_tiny.yaml \
        --dataset_name_or_path <packed corpus> --output_dir runs/tiny --max_steps 20   # one CPU process

Any configuration key can be overridden on the command line (``--learning_rate 1e-4``); ``--resume`` continues from
the newest complete checkpoint in ``output_dir``. Outputs in ``output_dir``: ``checkpoints/step-N/``,
``metrics.jsonl`` (one JSON line per step), ``logs/`` (TensorBoard), ``pretrain_config.yaml`` and ``final_model/``
(loads with ``AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch recipes/pretrain.py): make the kit importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.process_exit import destroy_process_group_if_any  # noqa: E402
from recipes.training.arguments import parse_pretrain_args  # noqa: E402
from recipes.training.trainer import run_pretraining  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    return run_pretraining(parse_pretrain_args(argv))


if __name__ == "__main__":
    try:
        main()
    finally:  # every exit, the SIGTERM checkpoint's included (see recipes/process_exit.py)
        destroy_process_group_if_any()
