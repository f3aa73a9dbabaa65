"""--overwrite and interrupted conversions: afterwards --output holds exactly the new model (every file of the old one
is deleted by name, a folder that also holds files of no model is refused), and a conversion killed half-way leaves
--output as it was."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_convert_safety import _error_line, _projector, _snapshot, runs  # noqa: F401 - runs is a fixture

from modeling_open_qwen2vl.conversion_errors import OutputFolderError
from modeling_open_qwen2vl.convert_prismatic_to_hf import main
from modeling_open_qwen2vl.hf_folder import convert_checkpoint

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# Loads a folder as a user would, in a fresh process: the projector's values and the tokenizer's size.
LOAD = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    projector = model.state_dict()["model.multi_modal_projector.linear_1.weight"]
    print(json.dumps({"projector": projector.flatten()[:64].tolist(), "vocab": len(processor.tokenizer)}))
    """
)

# Converts, but the process dies (no cleanup, as with kill -9 or a power cut) once the weights are written.
KILLED = textwrap.dedent(
    """
    import os, sys
    from modeling_open_qwen2vl.convert_prismatic_to_hf import main
    from modeling_open_qwen2vl.processing_open_qwen2vl import OpenQwen2VLProcessor
    OpenQwen2VLProcessor.save_pretrained = lambda *args, **kwargs: os._exit(3)
    main(sys.argv[1:])
    """
)

# Files other tools leave in a model folder, which a conversion writes none of.
STALE = {"vocab.json": "{}", "merges.txt": "#version: 0.2\n", "special_tokens_map.json": "{}",
         "preprocessor_config.json": "{}", "trainer_state.json": "{}", "training_args.bin": "pickled args",
         "modeling_llava.py": "# remote code of another model\n", "additional_chat_templates/old.jinja": "{{ x }}",
         "model-00001-of-00002.safetensors": "not weights"}


def _convert(run: Path, output: Path, *extra: str) -> int:
    return main(["--checkpoint", str(run), "--base-config", str(run / "base"), "--output", str(output),
                 "--no-sha256", *extra])


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _load_in_fresh_process(folder: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, env=ENV,
                            cwd=folder.parent, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _partial_folders(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.partial-*"))


def test_overwrite_leaves_exactly_the_new_model_and_names_what_it_removed(tmp_path, runs, caplog):
    (run_a, _), (run_b, checkpoint_b) = runs["a"], runs["b"]
    out, fresh = tmp_path / "hf", tmp_path / "fresh"
    assert _convert(run_a, out, "--max-shard-size", "20MB") == 0
    for name, text in STALE.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    assert _convert(run_b, fresh) == 0
    with caplog.at_level(logging.WARNING, logger="modeling_open_qwen2vl.hf_folder"):
        assert _convert(run_b, out, "--overwrite") == 0
    # The same files, byte for byte, as converting into an empty folder: nothing of the old model is left.
    assert _snapshot(out) == _snapshot(fresh)
    removed = next(r.getMessage() for r in caplog.records if "--overwrite: removed" in r.getMessage())
    for name in (*STALE, "model.safetensors.index.json", "tokenizer.json", "README.md", "config.json"):
        assert name in removed
    assert not _partial_folders(out)
    assert (out.stat().st_mode & 0o777) == (fresh.stat().st_mode & 0o777)  # the user's umask, not a temp dir's
    loaded = _load_in_fresh_process(out)
    assert loaded["projector"] == _projector(checkpoint_b).flatten()[:64].tolist()


def test_overwrite_refuses_a_model_folder_that_also_holds_other_files(tmp_path, runs, capsys):
    (run_a, _), (run_b, checkpoint_b) = runs["a"], runs["b"]
    out = tmp_path / "hf"
    assert _convert(run_a, out) == 0
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "table.md").write_text("| task | score |")
    before = _snapshot(out)
    capsys.readouterr()
    assert _convert(run_b, out, "--overwrite") == 2
    err = _error_line(capsys)
    assert "holds a model and files that are not part of one (eval/table.md, notes.txt)" in err
    assert "move them out of the folder" in err
    assert _snapshot(out) == before
    with pytest.raises(OutputFolderError, match=r"files that are not part of one \(eval/table\.md, notes\.txt\)"):
        convert_checkpoint(run_b, out, base_config=run_b / "base", compute_sha256=False, overwrite=True)
    assert _snapshot(out) == before

    # A cloned hub repository's plumbing is neither refused nor deleted.
    (out / "notes.txt").unlink()
    (out / "eval" / "table.md").unlink()
    (out / "eval").rmdir()
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert _convert(run_b, out, "--overwrite") == 0
    assert (out / ".git" / "HEAD").is_file() and (out / ".gitattributes").is_file()
    assert _load_in_fresh_process(out)["projector"] == _projector(checkpoint_b).flatten()[:64].tolist()


def test_a_readme_is_never_replaced_unasked(tmp_path, runs, capsys, caplog):
    run_a, _ = runs["a"]
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("# my project\n")
    assert _convert(run_a, out) == 2
    assert "already holds model files (README.md)" in _error_line(capsys)
    assert (out / "README.md").read_text() == "# my project\n"
    with caplog.at_level(logging.WARNING, logger="modeling_open_qwen2vl.hf_folder"):
        assert _convert(run_a, out, "--overwrite") == 0
    assert "removed 1 files of the previous model" in caplog.text and "README.md" in caplog.text
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: transformers")


def _kill_during_conversion(run: Path, output: Path, *extra: str) -> None:
    argv = ["--checkpoint", str(run), "--base-config", str(run / "base"), "--output", str(output), "--no-sha256",
            *extra]
    result = subprocess.run([sys.executable, "-c", KILLED, *argv], capture_output=True, text=True, env=ENV,
                            cwd=REPO, timeout=300)
    assert result.returncode == 3, result.stderr  # died after the weights were written, before the processor


def test_killed_conversion_leaves_no_folder_that_looks_complete(tmp_path, runs, caplog):
    (run_a, checkpoint_a), (run_b, _) = runs["a"], runs["b"]
    out = tmp_path / "hf"
    _kill_during_conversion(run_a, out)
    assert not out.exists()  # not a folder with config.json and weights but no tokenizer
    assert len(_partial_folders(out)) == 1  # the half-written copy is a hidden folder beside it
    with caplog.at_level(logging.WARNING, logger="modeling_open_qwen2vl.hf_folder"):
        assert _convert(run_a, out) == 0  # the rerun needs no --overwrite
    assert "was left by an interrupted conversion" in caplog.text
    assert _partial_folders(out)[0].name in caplog.text

    # Killed while replacing a model: the old model is still whole.
    before = _snapshot(out)
    _kill_during_conversion(run_b, out, "--overwrite")
    assert _snapshot(out) == before
    assert _load_in_fresh_process(out)["projector"] == _projector(checkpoint_a).flatten()[:64].tolist()


def test_interrupt_or_error_while_writing_cleans_up_and_changes_nothing(tmp_path, runs, monkeypatch):
    from modeling_open_qwen2vl.processing_open_qwen2vl import OpenQwen2VLProcessor

    (run_a, _), (run_b, _) = runs["a"], runs["b"]
    out = tmp_path / "hf"
    assert _convert(run_a, out) == 0
    before = _snapshot(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(OpenQwen2VLProcessor, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(run_b, out, base_config=run_b / "base", compute_sha256=False, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(run_b, tmp_path / "new", base_config=run_b / "base", compute_sha256=False)
    assert _snapshot(out) == before and not (tmp_path / "new").exists()
    assert not _partial_folders(out) and not _partial_folders(tmp_path / "new")


def test_export_and_convert_over_each_other_leave_only_the_new_format(tmp_path, runs):
    (run_a, checkpoint_a), (run_b, checkpoint_b) = runs["a"], runs["b"]
    assert _convert(run_a, tmp_path / "hf_a") == 0
    target = tmp_path / "target"
    assert _convert(run_b, target) == 0
    # HF folder -> prismatic run: no tokenizer, remote code or model card of the HF model stays beside the run.
    assert main(["--to-prismatic", str(tmp_path / "hf_a"), "--output", str(target), "--config",
                 str(run_a / "config.json"), "--overwrite"]) == 0
    assert _files(target) == {"checkpoints/latest-checkpoint.pt", "config.json"}
    exported = torch.load(target / "checkpoints" / "latest-checkpoint.pt", weights_only=True)
    assert torch.equal(_projector(exported), _projector(checkpoint_a))

    # Prismatic run -> HF folder: the run's checkpoint does not stay beside the HF model.
    run_copy = tmp_path / "run_b"
    assert _convert(run_b, tmp_path / "hf_b") == 0
    assert main(["--to-prismatic", str(tmp_path / "hf_b"), "--output", str(run_copy), "--config",
                 str(run_b / "config.json")]) == 0
    assert main(["--checkpoint", str(run_copy), "--base-config", str(run_b / "base"), "--output", str(target),
                 "--no-sha256", "--overwrite"]) == 0
    assert _files(target) == _files(tmp_path / "hf_b")
    assert _load_in_fresh_process(target)["projector"] == _projector(checkpoint_b).flatten()[:64].tolist()
