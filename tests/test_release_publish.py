"""What a release publishes (only the repository's files; the rest named and published only with --include), what
is checked before any slow work (repo id, offline, token), and how the upload treats an existing repository
(files it does not manage kept, --private never into a public repository, a branch with --revision).

The hub is never contacted: huggingface_hub.HfApi's network methods are replaced (test_release._fake_hub)."""

import ast
import re
import shutil

import pytest
import torch
from test_release import _corpus, _fake_hub, _write_shard

import recipes.release.hub_upload as hub_upload
import recipes.release.model_repo as model_repo
from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
from recipes.release import STAGING_MARKER, ReleaseError, build_dataset_repo, main, prepare_staging, upload


@pytest.fixture()
def model_folder(tmp_path, tiny_config, processor):
    """A saved tiny model with what a user leaves beside it: notes, a TODO list and a Trainer checkpoint folder."""
    folder = tmp_path / "model"
    torch.manual_seed(4)
    OpenQwen2VLForConditionalGeneration(tiny_config).save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "notes.md").write_text("private: ask legal before release\n")
    (folder / "TODO.md").write_text("- rerun eval\n")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-5" / "rng_state.pth").write_bytes(b"rng")
    return folder


def _staged(staging):
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file() and p.name != STAGING_MARKER)


def _left_out_line(out):
    return next(line for line in out.splitlines() if line.startswith("left out of the release"))


def test_model_notes_are_left_out_and_named_unless_included(tmp_path, model_folder, capsys):
    staging = tmp_path / "staging"
    assert main(["model", str(model_folder), "--repo-id", "org/x", "--staging", str(staging), "--dry-run"]) == 0
    out = capsys.readouterr().out
    staged = _staged(staging)
    assert "notes.md" not in staged and "TODO.md" not in staged and "model.safetensors" in staged
    assert _left_out_line(out).endswith("--include PATTERN publishes them): TODO.md, checkpoint-5/ (2 files), notes.md")
    assert "  model.safetensors  " in out and f"staged for model repository org/x: {len(staged)} files" in out

    assert main(["model", str(model_folder), "--repo-id", "org/x", "--staging", str(staging), "--dry-run",
                 "--include", "notes.md", "--include", "checkpoint-5/*.json"]) == 0
    assert (staging / "notes.md").read_text() == "private: ask legal before release\n"
    assert (staging / "checkpoint-5" / "trainer_state.json").read_text() == "{}"
    assert _left_out_line(capsys.readouterr().out).endswith("publishes them): TODO.md, checkpoint-5/rng_state.pth")
    assert main(["model", str(model_folder), "--repo-id", "org/x", "--staging", str(staging), "--dry-run",
                 "--include", "checkpoint-5/"]) == 2  # the folder holds a pickle
    assert "--include names weight or pickle files the released model does not load: checkpoint-5/rng_state.pth" \
        in capsys.readouterr().err


def test_include_that_matches_nothing_or_names_weights_is_refused(tmp_path, model_folder, capsys, monkeypatch):
    monkeypatch.setattr(model_repo, "_check_model_loads", lambda staging: None)  # loading is tested elsewhere
    staging = tmp_path / "staging"
    assert main(["model", str(model_folder), "--repo-id", "org/x", "--staging", str(staging), "--dry-run",
                 "--include", "docs/*.md"]) == 2
    assert "--include 'docs/*.md' matches no file in" in capsys.readouterr().err and not staging.exists()
    (model_folder / "old").mkdir()
    shutil.copy2(model_folder / "model.safetensors", model_folder / "old" / "model.safetensors")
    assert main(["model", str(model_folder), "--repo-id", "org/x", "--staging", str(staging), "--dry-run",
                 "--include", "old/"]) == 2
    assert "the released model does not load: old/model.safetensors" in capsys.readouterr().err


def test_dataset_files_outside_the_card_are_named_and_published_only_when_included(tmp_path, capsys):
    folder = _corpus(tmp_path)
    (folder / "notes.md").write_text("todo: check licenses\n")
    (folder / "LICENSE").write_text("CC-BY-4.0\n")
    (folder / "old").mkdir()
    shutil.copy2(folder / "ccs" / "00000.tar", folder / "old" / "00000.tar")  # shards no config names
    staging = tmp_path / "staging"
    assert main(["dataset", str(folder), "--repo-id", "org/c", "--staging", str(staging), "--dry-run"]) == 0
    assert _left_out_line(capsys.readouterr().out).endswith(
        "publishes them): LICENSE, ccs/.datatrove/reshard/stats/ (1 file), ccs/.datatrove/reshard/stats.json, "
        "notes.md, old/ (1 file)")
    assert not (staging / "notes.md").exists() and not (staging / "old").exists()
    assert main(["dataset", str(folder), "--repo-id", "org/c", "--staging", str(staging), "--dry-run",
                 "--include", "LICENSE"]) == 0
    assert (staging / "LICENSE").read_text() == "CC-BY-4.0\n" and "LICENSE" not in _left_out_line(
        capsys.readouterr().out)


@pytest.mark.parametrize(("data_files", "message"), [
    ("  data_dir: ccs\n", r"config 'ccs' has no data_files: .* would be published without data"),
    ("  data_files: ../elsewhere/*.tar\n", r"config 'ccs': pattern '../elsewhere/\*.tar' is not a path inside"),
])
def test_dataset_config_without_files_in_the_folder_is_refused(tmp_path, data_files, message):
    folder = _corpus(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy2(folder / "ccs" / "00000.tar", tmp_path / "elsewhere" / "00000.tar")
    card = folder / "README.md"
    card.write_text(card.read_text().replace("  data_files:\n  - split: train\n    path: ccs/*.tar\n", data_files))
    with pytest.raises(ReleaseError, match=message):
        build_dataset_repo(folder, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def _refused_before_staging(tmp_path, model_folder, capsys, monkeypatch, args):
    """(exit code, stderr) of a release that must stop before staging or the load check."""
    monkeypatch.setattr(model_repo, "_check_model_loads", lambda staging: pytest.fail("the load check ran"))
    staging = tmp_path / "staging"
    code = main(["model", str(model_folder), "--staging", str(staging)] + args)
    assert not staging.exists()
    return code, capsys.readouterr().err


def test_upload_without_network_or_token_is_refused_before_staging(tmp_path, model_folder, capsys, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err = _refused_before_staging(tmp_path, model_folder, capsys, monkeypatch, ["--repo-id", "org/x"])
    assert code == 2 and "error: HF_HUB_OFFLINE is set: unset it to upload" in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    code, err = _refused_before_staging(tmp_path, model_folder, capsys, monkeypatch, ["--repo-id", "org/x"])
    assert code == 2 and "error: no Hugging Face token found" in err


@pytest.mark.parametrize(("repo_id", "message"), [
    ("org/bad..name", "--repo-id 'org/bad..name' is not a valid repository id: Cannot have -- or .. in repo_id"),
    ("org/x/y", "--repo-id 'org/x/y' is not a valid repository id: Repo id must be in the form"),
    ("tiny", "--repo-id 'tiny' has no namespace: give it as <user or org>/tiny"),
])
def test_invalid_repo_id_is_refused_before_staging(tmp_path, model_folder, capsys, monkeypatch, repo_id, message):
    code, err = _refused_before_staging(tmp_path, model_folder, capsys, monkeypatch,
                                        ["--repo-id", repo_id, "--dry-run"])
    assert code == 2 and message in err


def _record_hub_calls(monkeypatch, private):
    """Extends _fake_hub: the repository's visibility, and the branches and revisions the calls used."""
    import huggingface_hub.hf_api as hf_api

    calls = {"branches": [], "revisions": []}
    commit = hf_api.HfApi.create_commit

    def create_commit(self, repo_id, operations, **kwargs):
        calls["revisions"].append(kwargs.get("revision"))
        return commit(self, repo_id, operations, **kwargs)

    monkeypatch.setattr(hf_api.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(hf_api.HfApi, "repo_info", lambda self, *a, **k: type("Info", (), {"private": private})())
    monkeypatch.setattr(hf_api.HfApi, "create_branch",
                        lambda self, repo_id, branch, **k: calls["branches"].append((branch, k.get("exist_ok"))))
    return calls


def _hub_files(hub):
    return sorted(str(p.relative_to(hub)) for p in hub.rglob("*") if p.is_file())


def test_private_release_into_a_public_repo_is_refused(tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "README.md").write_text("public card\n")
    _fake_hub(monkeypatch, hub)
    calls = _record_hub_calls(monkeypatch, private=False)
    staging = build_dataset_repo(_corpus(tmp_path), tmp_path / "staging")
    with pytest.raises(ReleaseError, match="org/c exists and is public, but --private was given: nothing was uploaded"):
        upload(staging, "org/c", "dataset", private=True)
    assert calls["revisions"] == [] and _hub_files(hub) == ["README.md"]

    _record_hub_calls(monkeypatch, private=True)  # a private repository: the release goes ahead
    upload(staging, "org/c", "dataset", private=True)
    assert (hub / "ccs" / "00000.tar").read_bytes() == (staging / "ccs" / "00000.tar").read_bytes()


def test_revision_commits_to_a_branch_created_when_missing(tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub"
    hub.mkdir()
    _fake_hub(monkeypatch, hub)
    calls = _record_hub_calls(monkeypatch, private=False)
    folder = _corpus(tmp_path)
    assert main(["dataset", str(folder), "--repo-id", "org/c", "--staging", str(tmp_path / "staging"),
                 "--revision", "v2"]) == 0
    assert "uploaded: https://hf.co/fake/commit" in capsys.readouterr().out
    assert calls == {"branches": [("v2", True)], "revisions": ["v2"]}
    assert (hub / "README.md").read_text() == (folder / "README.md").read_text()


def _snippet_calls(card, loader):
    """(first argument, revision= or None) of each ``loader`` call in the card's Python code blocks."""
    calls = []
    for code in re.findall(r"^```python\n(.*?)^```", card, re.DOTALL | re.MULTILINE):
        for node in ast.walk(ast.parse(code)):
            func = node.func if isinstance(node, ast.Call) else None
            if (getattr(func, "attr", None) or getattr(func, "id", None)) == loader:
                keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
                calls.append((ast.literal_eval(node.args[0]), keywords.get("revision")))
    return calls


@pytest.mark.parametrize(("revision_args", "revision"), [([], None), (["--revision", "main"], None),
                                                         (["--revision", "v2"], "v2")])
def test_model_card_snippet_loads_the_branch_released_to(tmp_path, model_folder, monkeypatch, revision_args, revision):
    monkeypatch.setattr(model_repo, "_check_model_loads", lambda staging: None)  # loading is tested elsewhere
    staging = tmp_path / "staging"
    assert main(["model", str(model_folder), "--repo-id", "org/x", "--staging", str(staging), "--dry-run"]
                + revision_args) == 0
    # copy-pasted, the snippet must load what was uploaded: the branch, not main
    assert _snippet_calls((staging / "README.md").read_text(), "from_pretrained") == [("org/x", revision)] * 2


def test_dataset_card_snippet_loads_the_branch_released_to(tmp_path):
    folder = _corpus(tmp_path)
    card = folder / "README.md"
    card.write_text(card.read_text() + '\n## Loading\n\n```python\nfrom datasets import load_dataset\n\n'
                    'ds = load_dataset("org/c", "ccs", split="train")  # decoded images\n'
                    'ds = load_dataset("webdataset", data_files="ccs/*.tar")  # a packaged builder: no branch\n```\n')
    assert main(["dataset", str(folder), "--repo-id", "org/c", "--staging", str(tmp_path / "s"), "--dry-run",
                 "--revision", "v2"]) == 0
    staged = (tmp_path / "s" / "README.md").read_text()
    assert _snippet_calls(staged, "load_dataset") == [("org/c", "v2"), ("webdataset", None)]
    assert 'split="train", revision="v2")  # decoded images' in staged and "revision" not in card.read_text()
    assert main(["dataset", str(folder), "--repo-id", "org/c", "--staging", str(tmp_path / "s"), "--dry-run"]) == 0
    assert (tmp_path / "s" / "README.md").read_text() == card.read_text()  # main: staged as written


@pytest.mark.parametrize("hint", ["placeholder", "absolute", "relative"])
@pytest.mark.parametrize("revision", [None, "v2"])
def test_dataset_card_snippet_loads_the_repo_not_the_local_folder(tmp_path, monkeypatch, hint, revision):
    """The card writer's snippets load "path/to/this/folder" or the --path-hint given (often the folder's path):
    copy-pasted from the released card, they must load the repository."""
    from dataset_builders.cards import write_dataset_card

    monkeypatch.chdir(tmp_path)  # a relative hint is relative to where the card was written
    folder = tmp_path / "corpus"
    (folder / "ccs_webdataset").mkdir(parents=True)
    _write_shard(folder / "ccs_webdataset" / "00000.tar", ["a red circle", "a blue square"])
    write_dataset_card(str(folder), path_hint={"placeholder": None, "absolute": str(folder),
                                               "relative": "./corpus/"}[hint])
    card = folder / "README.md"
    card.write_text(card.read_text() + '\n```python\nds = load_dataset("org/other", "ccs")  # another repository\n'
                    'ds = load_dataset("webdataset", data_files="ccs_webdataset/*.tar")\n```\n')
    written = card.read_text()
    assert main(["dataset", str(folder), "--repo-id", "org/c", "--staging", str(tmp_path / "s"), "--dry-run"]
                + (["--revision", revision] if revision else [])) == 0  # no local path left in the staged card
    staged = (tmp_path / "s" / "README.md").read_text()
    assert _snippet_calls(staged, "load_dataset") == [("org/c", revision)] * 2 + [("org/other", None),
                                                                                ("webdataset", None)]
    assert card.read_text() == written  # the folder's own card is not edited


def test_re_release_keeps_markdown_the_tool_does_not_write(tmp_path, monkeypatch, tiny_config, processor):
    hub = tmp_path / "hub"
    (hub / "docs").mkdir(parents=True)
    (hub / "README.md").write_text("card of release 1\n")
    (hub / "CHANGELOG.md").write_text("v1: first release\n")  # written on the hub by hand
    (hub / "docs" / "usage.md").write_text("how to prompt\n")
    staging = tmp_path / "staging"
    prepare_staging(tmp_path / "model", staging)
    OpenQwen2VLForConditionalGeneration(tiny_config).save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / "README.md").write_text("card of release 2\n")
    _fake_hub(monkeypatch, hub)
    upload(staging, "org/x", "model", private=False)
    assert (hub / "CHANGELOG.md").read_text() == "v1: first release\n"
    assert (hub / "docs" / "usage.md").read_text() == "how to prompt\n"
    assert (hub / "README.md").read_text() == "card of release 2\n"


def test_file_the_hub_would_refuse_for_its_size_is_refused_in_the_dry_run(tmp_path, monkeypatch, capsys):
    folder = _corpus(tmp_path)
    limit = (folder / "README.md").stat().st_size  # the card fits, the shards do not
    monkeypatch.setattr(hub_upload, "HUB_MAX_FILE_BYTES", limit)
    assert main(["dataset", str(folder), "--repo-id", "org/c", "--staging", str(tmp_path / "s"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "the hub refuses files over" in err and "ccs/00000.tar (" in err and "ccs/00001.tar (" in err
    assert "README.md" not in err.split("the hub refuses", 1)[1]
