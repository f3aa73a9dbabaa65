"""`python recipes/eval.py` end to end, in fresh processes, on a saved tiny model and local benchmark copies."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.eval import lively_tiny_model, write_local_copy  # noqa: E402

from modeling_open_qwen2vl import build_processor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAPER_EIGHT = ["mmbench", "seedbench", "mmstar", "mathvista", "ai2d", "textvqa", "pope", "mmmu"]
EXPECTED_DROPS = {"mmbench": 2, "seedbench": 1, "mmstar": 1, "mathvista": 1, "ai2d": 1, "textvqa": 1, "pope": 1,
                  "mmmu": 1, "easy_vqa": 0}


def run_cli(*args, env_extra=None, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    command = [sys.executable, str(ROOT / "recipes" / "eval.py"), *map(str, args), "--no-progress"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    model = lively_tiny_model()
    model.save_pretrained(root / "model")
    build_processor(model.config).save_pretrained(root / "model")
    for name in PAPER_EIGHT:
        write_local_copy(name, root / "data")
    return root


@pytest.fixture(scope="module")
def batched_run(workspace):
    out = workspace / "batched"
    run = run_cli("--model", workspace / "model", "--benchmarks", ",".join(PAPER_EIGHT + ["easy_vqa"]),
                  "--data-dir", workspace / "data", "--limit", 10, "--batch-size", 8, "--output", out)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_outputs_per_sample_summary_and_table(batched_run):
    out, run = batched_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["batch_size"] == 8 and summary["settings"]["prompt_format"] == "raw"
    assert summary["settings"]["stop_token_ids"][-2:] == [11, 198]
    table = (out / "results.md").read_text()
    for name, expected_drops in EXPECTED_DROPS.items():
        bench = summary["benchmarks"][name]
        records = read_jsonl(out / "samples" / f"{name}.jsonl")
        assert len(records) == bench["num_samples"] > 0
        assert bench["dropped"]["total"] == expected_drops
        assert bench["num_samples"] + expected_drops == bench["num_rows"]
        for record in records:
            assert {"id", "prompt", "output", "answer", "parsed", "correct"} <= set(record)
            assert record["prompt"].startswith("<s>")
        if name in ("pope", "easy_vqa"):
            continue
        # The headline accuracy is the mean of the per-sample results written next to it.
        mean = sum(float(r["correct"]) for r in records) / len(records)
        assert bench["accuracy"] == pytest.approx(mean)
        if bench["accuracy_strict"] is not None:
            strict_mean = sum(float(r["correct_strict"]) for r in records) / len(records)
            assert bench["accuracy_strict"] == pytest.approx(strict_mean)
        assert f"| {bench['title']} | {bench['num_samples']}" in table
    pope = read_jsonl(out / "samples" / "pope.jsonl")
    by_category = {}
    for record in pope:
        by_category.setdefault(record["meta"]["category"], []).append(float(record["correct"]))
    expected = sum(sum(v) / len(v) for v in by_category.values()) / len(by_category)
    assert summary["benchmarks"]["pope"]["accuracy"] == pytest.approx(expected)
    assert "Majority baseline" in table and "Paper" not in table
    assert "mmbench: dropped 2 row(s)" in run.stdout


def test_no_progress_hides_the_libraries_bars_too(batched_run):
    """--no-progress (run_cli passes it) leaves no tqdm bar in the log: not the kit's, nor those of datasets (loading
    and filtering a split) or transformers (loading weights)."""
    _, run = batched_run
    assert "%|" not in run.stderr and "Loading weights" not in run.stderr, run.stderr[:2000]
    assert "evaluating mmbench" in run.stderr  # the log itself is kept


def test_easy_vqa_keys_for_the_demo(batched_run):
    out, _ = batched_run
    bench = json.loads((out / "summary.json").read_text())["benchmarks"]["easy_vqa"]
    records = read_jsonl(out / "samples" / "easy_vqa.jsonl")
    assert bench["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / len(records))
    assert 0 <= bench["majority_baseline"] <= 1 and 0 < bench["chance_baseline"] < 1
    for record in records:  # the chosen answer is the candidate with the highest log-likelihood
        scores = record["output"]
        assert record["parsed"] == record["choices"][str(scores.index(max(scores)))]


def test_batch_size_one_gives_the_same_predictions(workspace, batched_run):
    out_batched, _ = batched_run
    out = workspace / "unbatched"
    names = ["mmbench", "mmmu", "ai2d", "easy_vqa"]
    run = run_cli("--model", workspace / "model", "--benchmarks", ",".join(names), "--data-dir", workspace / "data",
                  "--limit", 10, "--batch-size", 1, "--output", out)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in names:
        single = read_jsonl(out / "samples" / f"{name}.jsonl")
        batched = read_jsonl(out_batched / "samples" / f"{name}.jsonl")
        assert [r["id"] for r in single] == [r["id"] for r in batched]
        if name in ("mmbench", "mmmu"):  # generated text
            assert [r["output"] for r in single] == [r["output"] for r in batched]
            assert len({r["output"] for r in single}) > 1  # prompt-dependent answers, not one constant
        else:  # probabilities / log-likelihoods: same choices, numbers equal to float precision
            assert [r["parsed"] for r in single] == [r["parsed"] for r in batched]
            for a, b in zip(single, batched):
                assert a["output"] == pytest.approx(b["output"], abs=1e-4)


def test_paper_column_and_chat_prompt(workspace):
    out = workspace / "chat"
    run = run_cli("--model", workspace / "model", "--benchmarks", "ai2d", "--data-dir", workspace / "data",
                  "--prompt", "chat", "--paper-column", "always", "--output", out)
    assert run.returncode == 0, run.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert "Paper (Open-Qwen2VL (arXiv 2504.00595), Table 4)" in table and "| 66.3 |" in table
    record = read_jsonl(out / "samples" / "ai2d.jsonl")[0]
    assert record["prompt"].startswith("<|im_start|>system\n") and not record["prompt"].endswith("Answer:")


def test_unknown_benchmark_is_an_error_listing_the_known_ones(workspace):
    run = run_cli("--model", workspace / "model", "--benchmarks", "mmbench,vqav2", "--output", workspace / "x")
    assert run.returncode == 2
    assert "unknown benchmark 'vqav2'; known benchmarks: ai2d, easy_vqa, mathvista, mmbench, mmmu" in run.stderr
    assert not (workspace / "x").exists()


def test_a_benchmark_without_data_is_reported_and_the_others_still_run(workspace):
    data = workspace / "only_pope"
    write_local_copy("pope", data)
    out = workspace / "partial"
    run = run_cli("--model", workspace / "model", "--benchmarks", "pope,mmstar", "--data-dir", data, "--output", out)
    assert run.returncode == 1
    assert "could not evaluate: mmstar" in run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"]["pope"]["error"] is None and summary["benchmarks"]["pope"]["num_samples"] == 4
    assert summary["benchmarks"]["mmstar"]["error"].startswith("FileNotFoundError: no local copy of mmstar at")
    assert "| MMStar | failed: FileNotFoundError: no local copy of mmstar" in (out / "results.md").read_text()


@pytest.mark.slow
def test_two_processes_split_the_rows_and_agree_with_one(workspace, batched_run):
    out = workspace / "two_processes"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
               str(ROOT / "recipes" / "eval.py"), "--model", str(workspace / "model"), "--benchmarks",
               "mmbench,pope,easy_vqa", "--data-dir", str(workspace / "data"), "--limit", "10", "--output", str(out),
               "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["num_processes"] == 2
    reference = json.loads((batched_run[0] / "summary.json").read_text())
    for name in ["mmbench", "pope", "easy_vqa"]:
        assert summary["benchmarks"][name]["num_samples"] == reference["benchmarks"][name]["num_samples"]
        assert summary["benchmarks"][name]["dropped"]["total"] == reference["benchmarks"][name]["dropped"]["total"]
        assert summary["benchmarks"][name]["accuracy"] == pytest.approx(reference["benchmarks"][name]["accuracy"])
        ids = [r["id"] for r in read_jsonl(out / "samples" / f"{name}.jsonl")]
        assert ids == [r["id"] for r in read_jsonl(batched_run[0] / "samples" / f"{name}.jsonl")]


def test_an_interrupted_run_resumes_with_only_the_missing_rows(workspace, monkeypatch):
    """Predictions are spooled chunk by chunk (32 rows here); --resume predicts only what a crash left undone and
    gives the reports of an uninterrupted run."""
    from recipes import eval as eval_cli
    from recipes.evaluation import runner

    args = ["--model", workspace / "model", "--benchmarks", "easy_vqa", "--limit", 40, "--batch-size", 4,
            "--no-progress"]
    whole, cut = workspace / "uninterrupted", workspace / "interrupted"
    assert eval_cli.main(list(map(str, [*args, "--output", whole]))) == 0
    assert not (whole / ".partial").exists()  # removed once the reports are written

    real_predict, predicted = runner.predict, []

    def crash_on_the_second_chunk(benchmark, predictor, samples, options):
        if predicted:
            raise KeyboardInterrupt  # as a preempted job
        predicted.append(len(samples))
        return real_predict(benchmark, predictor, samples, options)

    monkeypatch.setattr(runner, "predict", crash_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        eval_cli.main(list(map(str, [*args, "--output", cut])))
    assert predicted == [32] and not (cut / "summary.json").exists()

    def counting(benchmark, predictor, samples, options):
        predicted.append(len(samples))
        return real_predict(benchmark, predictor, samples, options)

    monkeypatch.setattr(runner, "predict", counting)
    with pytest.raises(ValueError, match=r"made with other settings \(limit: earlier 40, now 39\)"):
        eval_cli.main(list(map(str, [*args[:5], 39, *args[6:], "--output", cut, "--resume"])))
    assert eval_cli.main(list(map(str, [*args, "--output", cut, "--resume"]))) == 0
    assert predicted == [32, 8]  # the second run predicted only the 8 rows the crash left
    assert read_jsonl(cut / "samples" / "easy_vqa.jsonl") == read_jsonl(whole / "samples" / "easy_vqa.jsonl")
    summaries = [json.loads((folder / "summary.json").read_text())["benchmarks"]["easy_vqa"] for folder in (whole, cut)]
    assert summaries[0]["accuracy"] == summaries[1]["accuracy"] and summaries[1]["num_samples"] == 40


def test_empty_and_repeated_benchmark_names_are_skipped(tmp_path, capsys):
    """A trailing comma is not an unknown benchmark '' and a repeated name runs once (checked without a model:
    --download-to only names what it would fetch, and easy_vqa has no Hub dataset)."""
    from recipes import eval as eval_cli

    assert eval_cli.main(["--benchmarks", "easy_vqa,,EASY-VQA,", "--download-to", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["easy_vqa: no Hub dataset (read from its package)"]
    with pytest.raises(SystemExit) as exit_:
        eval_cli.main(["--benchmarks", " , ", "--download-to", str(tmp_path)])
    assert exit_.value.code == 2
    assert "error: no benchmark given; known benchmarks: ai2d, easy_vqa" in capsys.readouterr().err


def test_max_new_tokens_must_be_positive_before_the_model_loads(tmp_path, capsys):
    from recipes import eval as eval_cli

    with pytest.raises(SystemExit) as exit_:  # the model folder does not exist: nothing may load before the check
        eval_cli.main(["--model", str(tmp_path / "no_model"), "--output", str(tmp_path / "out"),
                       "--max-new-tokens", "0"])
    assert exit_.value.code == 2
    assert "error: --max-new-tokens must be positive, got 0" in capsys.readouterr().err


def test_results_table_states_the_token_budget_the_run_used():
    from recipes.evaluation.report import markdown_table

    settings = {"prompt_format": "raw", "batch_size": 8}
    assert "greedy, at most 64 new tokens (the original: 16), stop at" in markdown_table(
        "m", {**settings, "max_new_tokens": 64}, {}, False)
    assert "greedy, at most 16 new tokens, stop at" in markdown_table(
        "m", {**settings, "max_new_tokens": 16}, {}, False)
