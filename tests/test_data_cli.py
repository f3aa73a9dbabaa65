"""`python -m dataset_builders`: every stage documented in --help, and a full score -> select -> reshard -> card ->
stats run through the command line, read back with datasets in a fresh process."""

import json
import os
import subprocess
import sys

import pytest

from dataset_builders.cli import build_parser
from dataset_builders.synthetic import save_tiny_clip, write_clean_shards

STAGES = {
    ("score", "clip"): ["--model", "--column", "--batch-size", "--device", "--dtype", "--executor", "--workers"],
    ("score", "mlm-filter"): ["--metrics", "--prompt-version", "--max-new-tokens", "--processor"],
    ("select",): ["--where", "--scores", "--uids", "--selection", "--min-side", "--max-aspect-ratio", "--min-words",
                  "--max-chars", "--drop-boilerplate", "--no-dedup-uid", "--slurm-partition", "--ray-address",
                  "--cpus-per-task", "--gpus-per-task", "--mem-per-cpu-gb", "--slurm-sbatch-arg"],
    ("reshard",): ["--selection", "--subset", "--shard-size", "--verify-images"],
    ("card",): ["--path-hint"],
    ("stats",): ["--json"],
    ("pack",): ["--num-image-tokens", "--capacity", "--algorithm", "--buffer-size", "--tokenizer", "--truncate",
                "--image-column", "--text-column", "--uid-column", "--executor"],
}


def _run(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "dataset_builders", *args], capture_output=True, text=True,
                          env=env, cwd=cwd)


def test_top_level_help_lists_every_stage():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for stage in ("score", "select", "reshard", "card", "stats", "pack"):
        assert f"    {stage} " in proc.stdout


@pytest.mark.parametrize("stage", list(STAGES), ids=lambda s: " ".join(s))
def test_stage_help_documents_its_options(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*stage, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in STAGES[stage]:
        assert option in text, (stage, option)


def test_stats_of_a_folder_that_is_no_logging_folder_is_an_error(tmp_path):
    # a mistyped path used to print "0 completed task(s): read 0 = kept 0 + dropped 0" and exit 0
    proc = _run("stats", str(tmp_path / "corpus" / "no_such_webdataset" / ".datatrove" / "reshard"))
    assert proc.returncode != 0
    assert "is not a stage's logging folder (no stats/ or completions/ in it)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_named_option_is_a_clear_error(tmp_path):
    proc = _run("select", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--uids", "no-equals-sign")
    assert proc.returncode != 0
    assert "--uids expects NAME=PATH" in proc.stderr
    proc = _run("select", "--input", str(tmp_path), "--output", str(tmp_path / "o"))
    assert proc.returncode == 2 and "select: error: no *.tar shards in" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run("select", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--tasks", "-1")
    assert proc.returncode == 2 and "argument --tasks: expected an integer >= 1, got -1" in proc.stderr
    assert not (tmp_path / "o").exists()  # refused before any settings were recorded


def _last_line(stderr):
    return stderr.strip().splitlines()[-1]


def test_unfinalized_selection_typo_and_missing_model_are_one_line_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataset_builders.pipelines import run_select
    from dataset_builders.selection import SelectionRules

    shards = tmp_path / "shards"
    rows = write_clean_shards(str(shards), num_shards=2, per_shard=3, seed=5)
    run_select(str(shards), str(tmp_path / "sel"), SelectionRules())
    (tmp_path / "sel" / "_manifest.json").unlink()  # as if select died before its finalizer
    proc = _run("reshard", "--input", str(shards), "--selection", str(tmp_path / "sel"), "--output",
                str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _last_line(proc.stderr) == (f"python -m dataset_builders reshard: error: selection {tmp_path / 'sel'} not "
                                       "finalized (no _manifest.json: select stopped before its uid de-duplication); "
                                       "rerun select")
    assert not (tmp_path / "out").exists()
    scores = tmp_path / "scores"
    scores.mkdir()
    for shard in ("00000", "00001"):
        pq.write_table(pa.table({"uid": [r["uid"] for r in rows], "key": [r["key"] for r in rows],
                                 "clip_score": pa.array([0.5] * len(rows), pa.float32())}), scores / f"{shard}.parquet")
    proc = _run("select", "--input", str(shards), "--output", str(tmp_path / "sel2"), "--scores", f"c={scores}",
                "--where", "clip_scor > 0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _last_line(proc.stderr) == ("python -m dataset_builders select: error: unknown name 'clip_scor' in "
                                       "selection rule 'clip_scor > 0'; available: ['clip_score', 'height', 'width']")
    assert not (tmp_path / "sel2").exists()  # nothing recorded: the corrected command is not refused
    proc = _run("score", "clip", "--input", str(shards), "--output", str(tmp_path / "sc"), "--model",
                str(tmp_path / "clip_typo"), "--device", "cpu")
    assert proc.returncode == 2  # an OSError from transformers, one line at the end (the task log shows its trace)
    assert _last_line(proc.stderr).startswith("python -m dataset_builders score: error: ")
    assert str(tmp_path / "clip_typo") in _last_line(proc.stderr)


@pytest.mark.slow
def test_command_line_pipeline_end_to_end(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_clean_shards(str(shards), num_shards=2, per_shard=6, seed=41)
    clip = save_tiny_clip(str(tmp_path / "clip"))
    proc = _run("score", "clip", "--input", str(shards), "--output", str(tmp_path / "scores"), "--model", clip,
                "--batch-size", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "score clip: read 12 = kept 12 + dropped 0" in proc.stdout
    proc = _run("select", "--input", str(shards), "--output", str(tmp_path / "sel"),
                "--scores", f"clip={tmp_path / 'scores'}", "--where", "top(clip_score, 0.5)", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "select: read 12 = kept 6 + dropped 6 (rule=6)" in proc.stdout
    proc = _run("reshard", "--input", str(shards), "--selection", str(tmp_path / "sel"), "--output",
                str(tmp_path / "corpus"), "--subset", "ccs", "--shard-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reshard: read 6 = kept 6 + dropped 0" in proc.stdout
    assert sorted(os.listdir(tmp_path / "corpus" / "ccs_webdataset")) == [
        ".datatrove", "00000.parquet", "00000.tar", "00001.parquet", "00001.tar"]
    proc = _run("stats", str(tmp_path / "corpus" / "ccs_webdataset" / ".datatrove" / "reshard"), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["kept"] == 6
    proc = _run("card", str(tmp_path / "corpus"), "--path-hint", "me/my-corpus")
    assert proc.returncode == 0 and "config_name: ccs" in proc.stdout
    assert 'load_dataset("me/my-corpus", "ccs"' in (tmp_path / "corpus" / "README.md").read_text()
    # a fresh process, as a user would: datasets' own webdataset builder reads the card's config
    code = ("from datasets import load_dataset; import sys; ds = load_dataset(sys.argv[1], 'ccs', split='train'); "
            "print(ds.num_rows, ds[0]['jpg'].size, sorted(ds.column_names))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "corpus")], capture_output=True, text=True,
                          env=dict(os.environ, HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0].startswith("6 (")
    assert "['__key__', '__url__', 'jpg', 'json', 'txt']" in proc.stdout
