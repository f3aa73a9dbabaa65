"""End-to-end offline demo (README command 1: `make demo`).

The paper's pipeline at tiny scale on real data from the `easy-vqa` package, each stage through the kit's own entry
points: caption shards in the img2dataset layout from easy-vqa training images (captions from ground-truth answers,
plus a few broken web-style samples); the data stages `python -m dataset_builders select` (text and image rules) and
`reshard`; `python -m dataset_builders pack` (16 image tokens per image, 512-position packs);
`accelerate launch recipes/pretrain.py` (low resolution: 16 image tokens, vision tower trained too);
`accelerate launch recipes/sft.py` on easy-vqa training questions (high resolution: 64 image tokens);
`recipes/eval.py --benchmarks easy_vqa` (multiple choice, majority baseline beside it); a reload with
`AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)` in a fresh process that answers a question
about a test image; and `report.md` with the accounting, the pack-fill histogram and the loss curves.

A failed step ends the run with a message naming the step, its exit code and the last lines of its error output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from recipes.demo_steps import PYTHON, CommandError, DemoStepError, StepRunner, run_command  # noqa: E402

# The kit's scripts and configs are found from this file, not the working folder, so the demo runs from any folder;
# its outputs still go to --output (demo_output/ in the working folder by default).
RECIPES_DIR = Path(__file__).resolve().parent


def kit_file(relative: str) -> str:
    """The absolute path of a file under recipes/ (``pretrain.py``, ``configs/sft_tiny.yaml``)."""
    return str(RECIPES_DIR / relative)


RELOAD_AND_ANSWER = textwrap.dedent(
    """
    import json, sys, torch
    import easy_vqa
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder, out, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    questions, answers, image_ids = easy_vqa.get_test_questions()
    image = Image.open(easy_vqa.get_test_image_paths()[image_ids[index]]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[index]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    json.dump({"class": type(model).__module__ + "." + type(model).__name__, "question": questions[index],
               "expected": answers[index], "answer": answer}, open(out, "w"))
    print(f"Q: {questions[index]}  expected: {answers[index]}  model: {answer!r}")
    """
)

# The steps in run order. main() adds each under its title here and --help lists them from here, so the numbers
# --help shows are the numbers a run prints.
STEPS = {
    "shards": "build caption shards from easy-vqa (img2dataset layout)",
    "select": "data stage: select (text and image rules, uid de-duplication)",
    "reshard": "data stage: reshard the selection into a corpus with a dataset card",
    "pack": "pack captions into sequences (offline packer)",
    "pretrain": "pretrain at low resolution (accelerate launch recipes/pretrain.py)",
    "sft_data": "write easy-vqa training questions as SFT conversations",
    "sft": "SFT at high resolution (accelerate launch recipes/sft.py)",
    "eval": "evaluate on the easy-vqa test split (recipes/eval.py)",
    "reload": "reload in a fresh process with trust_remote_code and answer a test question",
    "report": "write report.md (data accounting, pack-fill histogram, loss curves)",
}


def steps_help() -> str:
    """The numbered step list that --help shows."""
    return "steps:\n" + "\n".join(f"  {number}. {title}" for number, title in enumerate(STEPS.values(), start=1))


SETTINGS = {
    "seed": 0,
    "pretrain_image_tokens": 16,
    "sft_image_tokens": 64,
    "capacity": 512,
    "stage": "full",
    "pretrain_epochs": 2,
    "sft_steps": 1500,
    "sft_batch": 16,
    "sft_learning_rate": 1e-3,
}


def cpu_threads() -> int:
    """What accelerate would pick for one CPU process (OMP_NUM_THREADS, else the physical cores), passed explicitly
    so the launcher does not warn that it chose a default."""
    import psutil

    return int(os.environ.get("OMP_NUM_THREADS") or 0) or psutil.cpu_count(logical=False) or 1


def accelerate_launch(script: str, args: list[str]) -> list[str]:
    # --quiet: on failure the launcher exits without its own traceback, so the script's error ends the stderr
    # (the lines a failed step's message quotes) instead of the launcher's CalledProcessError.
    return [PYTHON, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1", "--num_machines", "1",
            "--num_cpu_threads_per_process", str(cpu_threads()), "--mixed_precision", "no", "--dynamo_backend", "no",
            "--cpu", script, *args]


# Written into the output folder at start: it marks the folder as the demo's (only such a folder, or an empty one,
# is ever deleted) and records the settings, which a --keep run must match for the data it reuses.
MARKER = "demo_settings.json"
# What the kept data stages depend on: select, reshard and pack skip their completed tasks, so with other values the
# pretraining would read the old packs while the report names the new settings.
DATA_SETTINGS = ("seed", "pretrain_image_tokens", "capacity")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse odd values up front, not after minutes of data stages and training (0 would also be read as "unset":
    all 9,673 questions for --eval-limit, TRL's epochs for --sft-steps)."""
    for flag, value in (("--sft-steps", args.sft_steps), ("--pretrain-epochs", args.pretrain_epochs),
                        ("--eval-limit", args.eval_limit)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.seed < 2**32:  # the range the training scripts' set_seed accepts
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")


def prepare_output(parser: argparse.ArgumentParser, out: Path, settings: dict, keep: bool) -> None:
    """Start a fresh output folder (or keep one, --keep) and write the marker with the run's settings.

    An existing folder is deleted or kept only when it is empty or holds the marker; a --keep run must have the
    recorded data settings."""
    if out.exists():
        if not out.is_dir():
            parser.error(f"--output {out} is a file, not a folder")
        if not (out / MARKER).is_file() and any(out.iterdir()):
            parser.error(f"--output {out} is not empty and is not a demo output folder (no {MARKER}); refusing to "
                         "delete or reuse it: pick a new folder, or remove it yourself")
        if keep and (out / MARKER).is_file():
            recorded = json.loads((out / MARKER).read_text())
            changed = [f"{key} {recorded.get(key)} -> {settings[key]}" for key in DATA_SETTINGS
                       if recorded.get(key) != settings[key]]
            if changed:
                parser.error(f"--keep: {out} holds data made with other settings ({', '.join(changed)}), which its "
                             "completed data stages would not redo; run without --keep to start fresh")
        if not keep:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=steps_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("demo_output"),
                        help="output folder (default: demo_output in the working folder); an existing one is deleted "
                             "first only if it is empty or a demo output")
    parser.add_argument("--seed", type=int, default=SETTINGS["seed"])
    parser.add_argument("--sft-steps", type=int, default=SETTINGS["sft_steps"])
    parser.add_argument("--pretrain-epochs", type=int, default=SETTINGS["pretrain_epochs"])
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test questions")
    parser.add_argument("--keep", action="store_true",
                        help="keep an existing demo output folder (default: start fresh); reuses the data stages' "
                             "completed work, so the seed must be the one it was made with")
    args = parser.parse_args(argv)
    check_args(parser, args)
    settings = {**SETTINGS, "seed": args.seed, "sft_steps": args.sft_steps, "pretrain_epochs": args.pretrain_epochs}

    out = args.output.resolve()
    prepare_output(parser, out, settings, args.keep)
    paths = {name: out / name for name in ("raw", "selection", "corpus", "packed", "pretrain", "sft_data", "sft",
                                           "eval")}
    subset_dir = paths["corpus"] / "easy_vqa_captions_webdataset"
    packed_config = f"packed_{settings['pretrain_image_tokens']}"
    answer_file = out / "answer.json"
    data = {}

    def build_shards() -> None:
        from recipes.demo_data import write_caption_shards

        data["shards"] = write_caption_shards(paths["raw"], shard_size=1000, seed=settings["seed"])
        print(f"wrote {data['shards']['samples']} samples ({data['shards']['noise']} deliberately broken) in "
              f"{data['shards']['shards']} shards to {paths['raw']}")

    runner = StepRunner()
    runner.add(STEPS["shards"], build_shards)
    runner.add(STEPS["select"], lambda: run_command(
        [PYTHON, "-m", "dataset_builders", "select", "--input", str(paths["raw"]), "--output",
         str(paths["selection"]), "--min-words", "2", "--drop-boilerplate", "--min-side", "16"]))
    runner.add(STEPS["reshard"], lambda: run_command(
        [PYTHON, "-m", "dataset_builders", "reshard", "--input", str(paths["raw"]), "--selection",
         str(paths["selection"]), "--output", str(paths["corpus"]), "--subset", "easy_vqa_captions",
         "--shard-size", "1000"]))
    runner.add(STEPS["pack"], lambda: run_command(
        [PYTHON, "-m", "dataset_builders", "pack", "--input", str(subset_dir), "--output", str(paths["packed"]),
         "--num-image-tokens", str(settings["pretrain_image_tokens"]), "--capacity", str(settings["capacity"]),
         "--tasks", "1"]))
    runner.add(STEPS["pretrain"], lambda: run_command(
        accelerate_launch(kit_file("pretrain.py"), [
            "--config", kit_file("configs/pretrain_tiny.yaml"), "--dataset_name_or_path", str(paths["packed"]),
            "--dataset_config_name", packed_config, "--num_image_tokens", str(settings["pretrain_image_tokens"]),
            "--max_length", str(settings["capacity"]), "--stage", settings["stage"],
            "--num_train_epochs", str(settings["pretrain_epochs"]), "--save_steps", "100000",
            "--seed", str(settings["seed"]), "--output_dir", str(paths["pretrain"]),
            "--overwrite_output_dir"])))  # with --keep too, pretraining starts over (only data-stage work is reused)

    def write_sft_data() -> None:
        from recipes.sft_data.easy_vqa import write_easy_vqa_sft

        path = write_easy_vqa_sft(paths["sft_data"], split="train")
        print(f"wrote {sum(1 for _ in path.open())} training conversations to {path}")

    runner.add(STEPS["sft_data"], write_sft_data)
    runner.add(STEPS["sft"], lambda: run_command(
        accelerate_launch(kit_file("sft.py"), [
            "--config", kit_file("configs/sft_tiny.yaml"),
            "--model_name_or_path", str(paths["pretrain"] / "final_model"),
            "--num_image_tokens", str(settings["sft_image_tokens"]), "--train_vision",
            "--dataset_name", str(paths["sft_data"] / "train.jsonl"), "--image_root", str(paths["sft_data"]),
            "--max_steps", str(settings["sft_steps"]), "--per_device_train_batch_size", str(settings["sft_batch"]),
            "--learning_rate", str(settings["sft_learning_rate"]), "--logging_steps", "25",
            "--seed", str(settings["seed"]), "--output_dir", str(paths["sft"])])))
    eval_args = [PYTHON, kit_file("eval.py"), "--model", str(paths["sft"]), "--benchmarks", "easy_vqa",
                 "--prompt", "chat", "--batch-size", "16", "--output", str(paths["eval"])]
    if args.eval_limit is not None:
        eval_args += ["--limit", str(args.eval_limit)]
    runner.add(STEPS["eval"], lambda: run_command(eval_args))
    runner.add(STEPS["reload"], lambda: run_command(
        [PYTHON, "-c", RELOAD_AND_ANSWER, str(paths["sft"]), str(answer_file), "0"]))

    # A step like the others, so a failure while writing the report is named too; its table times the steps before it.
    def write_report_step() -> None:
        data["report"] = _report(out, paths, subset_dir, packed_config, settings, runner.timings, answer_file)
        print(f"wrote {data['report']}")

    runner.add(STEPS["report"], write_report_step)
    try:
        runner.run()
    except DemoStepError as err:
        return _failed(err)

    report = data["report"]
    summary = json.loads((paths["eval"] / "summary.json").read_text())["benchmarks"]["easy_vqa"]
    print(f"\neasy-vqa accuracy {100 * summary['accuracy']:.1f}% vs majority baseline "
          f"{100 * summary['majority_baseline']:.1f}% ({100 * (summary['accuracy'] - summary['majority_baseline']):+.1f}"
          f" points). Report: {report}")
    return 0


def _failed(err: DemoStepError) -> int:
    """End a failed run with one message saying which step failed and why; the runner's frames are no help.

    A command's own output is already on screen; an in-process step's traceback is printed, from the step down."""
    if not isinstance(err.error, CommandError):
        error = err.error
        traceback.print_exception(type(error), error, error.__traceback__ and error.__traceback__.tb_next)
    print(f"\n{err}", file=sys.stderr, flush=True)
    return 1


def _report(out: Path, paths: dict, subset_dir: Path, packed_config: str, settings: dict, timings: dict,
            answer_file: Path) -> Path:
    from dataset_builders.accounting import ACCOUNTING_FILE, PACKING_STATS_FILE
    from recipes.demo_report import pack_fills, write_report
    from recipes.training.run_logs import METRICS_FILE, SFT_TRAINING_LOG, read_jsonl

    pack_stats = json.loads((paths["packed"] / packed_config / PACKING_STATS_FILE).read_text())
    accounting = {
        "select": json.loads((paths["selection"] / ".datatrove" / "select" / ACCOUNTING_FILE).read_text()),
        "reshard": json.loads((subset_dir / ".datatrove" / "reshard" / ACCOUNTING_FILE).read_text()),
        "pack": {"read": pack_stats["read"], "kept": pack_stats["documents"],
                 "dropped": sum(pack_stats["dropped"].values()), "dropped_by_reason": pack_stats["dropped"]},
    }
    curves = {
        "pretraining (packed captions)": [(r["step"], r["loss"]) for r in read_jsonl(paths["pretrain"] / METRICS_FILE)],
        "SFT (easy-vqa questions)": [(r["step"], r["loss"]) for r in read_jsonl(paths["sft"] / SFT_TRAINING_LOG)
                                     if "loss" in r],
    }
    return write_report(
        out, accounting=accounting, pack_stats=pack_stats,
        fills=pack_fills(paths["packed"] / packed_config, settings["capacity"]), curves=curves,
        eval_summary=json.loads((paths["eval"] / "summary.json").read_text()),
        answer=json.loads(answer_file.read_text()), timings=timings, settings=settings)


if __name__ == "__main__":
    raise SystemExit(main())
