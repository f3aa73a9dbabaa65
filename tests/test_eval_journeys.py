"""User journeys through `recipes/eval.py` that go off the happy path: a run killed with SIGKILL and resumed, a torn
predictions file, --resume refused for another model or other settings, data fixed between a failed run and its
resume, corrupt images, odd answer formats scored against hand computations, reports that stay whole when reporting
fails, and a model folder saved before tokenizers recorded their padding side.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.eval import fixture, lively_tiny_model, write_local_copy  # noqa: E402

from modeling_open_qwen2vl import build_processor  # noqa: E402
from recipes import eval as eval_cli  # noqa: E402
from recipes.evaluation import EvalOptions, SampleError, evaluate_benchmark, get_benchmark  # noqa: E402
from recipes.evaluation import runner  # noqa: E402
from recipes.evaluation.prompts import PromptFormatter  # noqa: E402
from recipes.evaluation.resume import PARTIAL_DIR, PredictionSpool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
REAL_PREDICT = runner.predict


def save_model(folder: Path, seed: int = 0) -> Path:
    model = lively_tiny_model(seed=seed)
    model.save_pretrained(folder)
    build_processor(model.config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_journeys")
    save_model(root / "model")
    for name in ("pope", "mmbench"):
        write_local_copy(name, root / "data")
    return root


def cli_command(*args):
    return [sys.executable, str(ROOT / "recipes" / "eval.py"), *map(str, args), "--no-progress"]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def main(*args) -> int:
    return eval_cli.main([*map(str, args), "--no-progress"])


class Counting:
    """Wraps ``runner.predict``: records how many samples each call predicted, per benchmark; can crash on one."""

    def __init__(self, crash_on: str | None = None):
        self.real = REAL_PREDICT
        self.calls = []  # (benchmark name, prompts)
        self.crash_on = crash_on

    def __call__(self, benchmark, predictor, samples, options):
        if benchmark.name == self.crash_on:
            raise KeyboardInterrupt  # as a preempted job
        self.calls.append((benchmark.name, [s.prompt for s in samples]))
        return self.real(benchmark, predictor, samples, options)

    def count(self, name):
        return sum(len(prompts) for benchmark, prompts in self.calls if benchmark == name)


# ---------------------------------------------------------------- killed and resumed


def test_sigkill_mid_run_and_a_torn_last_line_then_resume_gives_the_uninterrupted_results(workspace):
    """A real SIGKILL after the first chunk of predictions (32 rows) reached the spool, the last spooled line then
    torn as by a kill mid-write; the resumed run, in a fresh process, writes exactly the uninterrupted reports."""
    args = ["--model", workspace / "model", "--benchmarks", "easy_vqa,pope", "--data-dir", workspace / "data",
            "--limit", 48, "--batch-size", 8]
    whole, cut = workspace / "whole", workspace / "killed"
    assert main(*args, "--output", whole) == 0

    spool = cut / PARTIAL_DIR / "easy_vqa.rank0.jsonl"
    process = subprocess.Popen(cli_command(*args, "--output", cut), env=ENV, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (spool.is_file() and spool.read_text(encoding="utf-8").endswith("\n")):
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    spooled = read_jsonl(spool)
    assert 0 < len(spooled) < 48 and not (cut / "summary.json").exists()
    lines = spool.read_text(encoding="utf-8").splitlines(keepends=True)
    torn = "".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2]  # the last record cut in half, no newline
    spool.write_text(torn, encoding="utf-8")

    resumed = subprocess.run(cli_command(*args, "--output", cut, "--resume"), env=ENV, cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"easy_vqa: {len(spooled) - 1} rows already predicted (--resume)" in resumed.stderr
    assert "is not valid JSON (an interrupted write?)" in resumed.stderr
    for name in ("easy_vqa", "pope"):
        rows = read_jsonl(cut / "samples" / f"{name}.jsonl")
        assert rows == read_jsonl(whole / "samples" / f"{name}.jsonl")
        assert len({r["id"] for r in rows}) == len(rows)  # no duplicated row
    assert len(read_jsonl(cut / "samples" / "easy_vqa.jsonl")) == 48  # no missing row
    summaries = [json.loads((folder / "summary.json").read_text())["benchmarks"] for folder in (whole, cut)]
    for name in ("easy_vqa", "pope"):
        for key in ("accuracy", "accuracy_strict", "num_samples", "dropped"):
            assert summaries[0][name][key] == summaries[1][name][key]
    assert not (cut / PARTIAL_DIR).exists()


def test_a_record_appended_after_a_torn_line_is_kept(tmp_path):
    spool = PredictionSpool(tmp_path, rank=0)
    spool.append("pope", [(0, "k0", "yes"), (1, "k1", "no")])
    path = tmp_path / "pope.rank0.jsonl"
    path.write_text(path.read_text()[:-5])  # killed while writing row 1
    assert spool.done("pope") == {0: ("k0", "yes")}
    spool.append("pope", [(1, "k1", "no"), (2, "k2", "yes")])  # the resumed run predicts row 1 again, then row 2
    assert spool.done("pope") == {0: ("k0", "yes"), 1: ("k1", "no"), 2: ("k2", "yes")}


# ---------------------------------------------------------------- --resume refused


def test_resume_is_refused_for_other_settings_another_model_or_an_overwritten_model(workspace, tmp_path,
                                                                                   monkeypatch):
    model = save_model(tmp_path / "model")
    args = ["--model", model, "--benchmarks", "pope", "--data-dir", workspace / "data"]
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "predict", Counting(crash_on="pope"))
    with pytest.raises(KeyboardInterrupt):  # interrupted before its first prediction
        main(*args, "--output", out)
    monkeypatch.setattr(runner, "predict", Counting())

    with pytest.raises(ValueError, match=r"--resume: the predictions in .* were made with other settings "
                                         r"\(max_new_tokens: earlier 16, now 4\); run without --resume"):
        main(*args, "--max-new-tokens", 4, "--output", out, "--resume")
    with pytest.raises(ValueError, match=r"other settings \(prompt_format: earlier 'raw', now 'chat'\)"):
        main(*args, "--prompt", "chat", "--output", out, "--resume")
    other = [workspace / "model" if a == model else a for a in args]
    with pytest.raises(ValueError, match=r"other settings \(model: earlier '.*', now '.*'; model_files: "):
        main(*other, "--output", out, "--resume")

    # Same path, new weights (a later training run saved over it): the spooled answers are not this model's.
    save_model(model, seed=1)
    later = time.time() + 10  # whatever the file system's clock resolution, the files were written later
    for path in model.iterdir():
        os.utime(path, (later, later))
    with pytest.raises(ValueError, match=r"other settings \(model_files: earlier '[0-9a-f]{16}', now '[0-9a-f]{16}'\)"):
        main(*args, "--output", out, "--resume")
    assert runner.predict.calls == []


def test_relative_and_absolute_paths_to_one_model_folder_are_the_same_model(workspace, monkeypatch):
    from recipes.evaluation.resume import model_fingerprint

    absolute = model_fingerprint(str(workspace / "model"))
    monkeypatch.chdir(workspace)
    assert model_fingerprint("model") == absolute
    assert absolute["model"] == str((workspace / "model").resolve())


# ---------------------------------------------------------------- a failing benchmark, fixed data, --resume


def test_bad_data_fails_one_benchmark_by_name_and_the_fixed_data_resumes(workspace, tmp_path, monkeypatch):
    """mmbench's file is garbage: pope still finishes, mmbench is named as failed, exit 1, predictions kept. The data
    is then fixed (and one pope question edited meanwhile): --resume predicts mmbench and the edited pope row only,
    and the reports equal those of a clean run over the final data."""
    data = tmp_path / "data"
    write_local_copy("pope", data)
    broken = write_local_copy("mmbench", data)
    parquet = next(broken.glob("data/*.parquet"))
    parquet.write_bytes(b"this is not a parquet file")
    args = ["--model", workspace / "model", "--benchmarks", "pope,mmbench", "--data-dir", data]
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "predict", Counting())
    assert main(*args, "--output", out) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"]["pope"]["error"] is None and summary["benchmarks"]["pope"]["num_samples"] == 4
    assert summary["benchmarks"]["mmbench"]["error"]
    assert "| MMBench-EN dev | failed: " in (out / "results.md").read_text()
    assert (out / PARTIAL_DIR / "pope.rank0.jsonl").is_file()  # kept for --resume

    write_local_copy("mmbench", data)
    rows = [dict(r) for r in fixture("pope")["rows"]]
    rows[1]["question"] = "Is there a cat in the image?"  # row 2 changed since it was predicted
    write_local_copy("pope", data, rows)
    counting = Counting()
    monkeypatch.setattr(runner, "predict", counting)
    assert main(*args, "--output", out, "--resume") == 0
    assert counting.count("mmbench") == 3
    assert [prompt for name, prompts in counting.calls if name == "pope" for prompt in prompts] == [
        "<s><image>\nQuestion: Is there a cat in the image?\nAnswer the question using a single word or phrase."
        "\nAnswer:"
    ]
    clean = tmp_path / "clean"
    assert main(*args, "--output", clean) == 0
    for name in ("pope", "mmbench"):
        assert read_jsonl(out / "samples" / f"{name}.jsonl") == read_jsonl(clean / "samples" / f"{name}.jsonl")
    assert not (out / PARTIAL_DIR).exists()


# ---------------------------------------------------------------- corrupt images


class Scripted:
    """Answers each prompt by the first script key it contains (stands in for ``Predictor``)."""

    tokenizer = None

    def __init__(self, script):
        self.script = script

    def generate(self, prompts, images, max_new_tokens, stop_token_ids):
        return [next(v for k, v in self.script.items() if k in p) for p in prompts]


def scripted_run(name, data_dir, rows, script):
    write_local_copy(name, data_dir, rows)
    options = EvalOptions(data_dir=data_dir, show_progress=False)
    return evaluate_benchmark(get_benchmark(name), Scripted(script), options, PromptFormatter("raw"))


def test_corrupt_images_are_named_by_their_row_id_and_counted_under_one_reason(tmp_path):
    rows = [dict(r) for r in fixture("pope")["rows"]]
    rows[1]["image"] = rows[2]["image"] = "corrupt"  # question ids "2" and "3"
    result = scripted_run("pope", tmp_path, rows, {"triangle": "yes", "car": "no"})
    assert [s.sample_id for s in result.samples] == ["1", "4"]
    assert result.drops.reasons == Counter({"unreadable row: UnidentifiedImageError": 2,
                                            "answer 'maybe' is not yes/no": 1})
    examples = result.drops.as_dict()["examples"]
    assert [e["id"] for e in examples] == ["2", "3", "5"]  # the rows' own ids, not their positions
    assert examples[0]["detail"].startswith("cannot identify image file")


def test_an_unreadable_image_cell_gives_one_reason_for_every_row():
    from recipes.evaluation.benchmarks._common import image_field

    errors = []
    for junk in (b"not an image", b"\x89PNG but broken"):
        with pytest.raises(SampleError) as info:
            image_field({"bytes": junk, "path": None})
        errors.append(info.value)
    assert str(errors[0]) == str(errors[1]) == "unreadable image (image): UnidentifiedImageError"
    assert errors[0].detail.startswith("cannot identify image file")


# ---------------------------------------------------------------- odd answer formats, scored by hand


def test_odd_answer_formats_against_hand_computed_scores(tmp_path):
    # MMBench, gold C / A / B. Harness: gold letter in the lower-cased output; VLMEvalKit: the one capital option
    # letter among the words once ".()[],:;!*#{}" are blanked, else the one option text contained.
    mmbench = scripted_run("mmbench", tmp_path, None, {
        "What shape": "(C)",  # harness yes; VLMEvalKit "C"
        "single colour": "Answer: a",  # harness yes ("a" in "answer: a"); no capital letter, no option text -> no
        "Which colour": "B.",  # both
    })
    assert [r["correct"] for r in mmbench.scores.per_sample] == [True, True, True]
    assert [r["correct_strict"] for r in mmbench.scores.per_sample] == [True, False, True]
    assert mmbench.scores.original["accuracy"] == pytest.approx(3 / 3)
    assert mmbench.scores.strict["accuracy"] == pytest.approx(2 / 3)

    # MMStar, gold B / A (its third row has no image). Harness: the gold letter in the output, case-sensitive.
    mmstar = scripted_run("mmstar", tmp_path, None, {
        "Which shape": "(B) a triangle",  # both ("a" is no capital letter)
        "background": "answer: a",  # harness: no "A"; VLMEvalKit: no capital letter, no option text -> no
    })
    assert [r["correct"] for r in mmstar.scores.per_sample] == [True, False]
    assert [r["correct_strict"] for r in mmstar.scores.per_sample] == [True, False]

    # POPE: harness strips "," then "." from the ends and lower-cases, mean over categories (adversarial: rows 1-2,
    # popular: 3, random: 4); POPE's rule: "No", "no" or "not" among the first sentence's words means no, pooled.
    pope = scripted_run("pope", tmp_path, None, {
        "triangle": "Yes.",  # gold yes: harness yes; POPE yes
        "dog": "NO",  # gold no: harness "no"; POPE: "NO" is none of its words -> yes, wrong
        "circle": "yes,",  # gold yes: both
        "car": "No, there isn't",  # gold no: harness "no, there isn't" wrong; POPE "No" -> right
    })
    assert pope.scores.original["accuracy"] == pytest.approx((2 / 2 + 1 / 1 + 0 / 1) / 3)
    assert pope.scores.strict["accuracy"] == pytest.approx(3 / 4)

    # MathVista. Harness (as run): MMMU open-answer parsing against the gold letter / answer text; MathVista's own
    # rule: int(float(x)) / round(float(x), precision) of the stripped response, a letter picks its choice.
    rows = [dict(r) for r in fixture("mathvista")["rows"][:3]]
    rows.append(dict(rows[1], pid="5", question="How many dots are there?", answer="1000"))
    mathvista = scripted_run("mathvista", tmp_path, rows, {
        "most sides": "C",  # gold C (rectangle): " c" / "c " match; MathVista: letter C -> rectangle
        "triangle have": "Answer: 3",  # the number 3 is extracted; MathVista: int(float("Answer: 3")) fails
        "ratio of width": "1.50 cm",  # 1.50 -> 1.5 == 1.5; MathVista: float("1.50 cm") fails
        "dots": "1,000",  # comma-grouped 1000; MathVista: float("1,000") fails
    })
    assert [r["correct"] for r in mathvista.scores.per_sample] == [True, True, True, True]
    assert [r["correct_strict"] for r in mathvista.scores.per_sample] == [True, False, False, False]
    assert mathvista.scores.strict["accuracy"] == pytest.approx(1 / 4)


# ---------------------------------------------------------------- reports


def test_a_failure_while_reporting_leaves_the_previous_reports_whole(workspace, tmp_path, monkeypatch):
    from recipes.evaluation import report

    args = ["--model", workspace / "model", "--benchmarks", "pope,mmbench", "--data-dir", workspace / "data"]
    out = tmp_path / "out"
    assert main(*args, "--limit", 2, "--output", out) == 0
    files = ["summary.json", "results.md", "samples/pope.jsonl", "samples/mmbench.jsonl"]
    before = {name: (out / name).read_bytes() for name in files}

    def broken_table(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "markdown_table", broken_table)
    with pytest.raises(RuntimeError, match="disk full"):
        main(*args, "--output", out)  # all rows this time: every report would change
    assert {name: (out / name).read_bytes() for name in files} == before
    assert sorted(p.name for p in out.iterdir()) == [".partial", "results.md", "samples", "summary.json"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["mmbench.jsonl", "pope.jsonl"]


def test_reports_with_non_ascii_text_are_utf8_whatever_the_locale(workspace, tmp_path):
    """A drop reason quoting the data ("peut-être") under an ASCII locale; reloaded in a fresh process."""
    rows = [dict(r) for r in fixture("pope")["rows"]]
    rows[4]["answer"] = "peut-être"
    write_local_copy("pope", tmp_path / "data", rows)
    out = tmp_path / "out"
    env = dict(ENV, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    run = subprocess.run(cli_command("--model", workspace / "model", "--benchmarks", "pope", "--data-dir",
                                     tmp_path / "data", "--output", out), env=env, cwd=ROOT, capture_output=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reload = ("import json, sys; s = json.load(open(sys.argv[1], encoding='utf-8'));"
              "print(json.dumps(s['benchmarks']['pope']['dropped']['by_reason']))")
    loaded = subprocess.run([sys.executable, "-c", reload, str(out / "summary.json")], capture_output=True, text=True,
                            env=ENV, check=True)
    assert json.loads(loaded.stdout) == {"answer 'peut-être' is not yes/no": 1}
    assert "pope: dropped 1 row(s): {\"answer 'peut-\\xeatre' is not yes/no\": 1}" in run.stdout.decode("ascii")


# ---------------------------------------------------------------- a model folder from before padding_side was saved


def test_a_tokenizer_saved_without_padding_side_still_pads_left_in_batches(workspace, tmp_path):
    import shutil

    old = tmp_path / "old_model"
    shutil.copytree(workspace / "model", old)
    config_path = old / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("padding_side", None)
    config_path.write_text(json.dumps(config))
    args = ["--model", old, "--benchmarks", "pope,mmbench", "--data-dir", workspace / "data"]
    assert main(*args, "--batch-size", 1, "--output", tmp_path / "single") == 0
    assert main(*args, "--batch-size", 4, "--output", tmp_path / "batched") == 0
    for name in ("pope", "mmbench"):
        single = read_jsonl(tmp_path / "single" / "samples" / f"{name}.jsonl")
        batched = read_jsonl(tmp_path / "batched" / "samples" / f"{name}.jsonl")
        assert [r["output"] for r in single] == [r["output"] for r in batched]
    assert len({r["output"] for r in single + batched}) > 1  # the answers depend on the prompt
