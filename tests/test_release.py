"""Release tooling: built repositories load in a fresh process; incomplete folders are refused with a reason."""

import io
import json
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch
from PIL import Image

from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
from recipes.release import ReleaseError, build_dataset_repo, main, upload

LOAD_MODEL = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    ids = processor(text="<s>hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        print(json.dumps(model(input_ids=ids).logits[0, -1, :20].tolist()))
    """
)

LOAD_DATASET = textwrap.dedent(
    """
    import json, sys
    from datasets import load_dataset
    ds = load_dataset(sys.argv[1], sys.argv[2], split="train")
    print(json.dumps({"rows": len(ds), "captions": sorted(ds["txt"]), "size": list(ds[0]["jpg"].size)}))
    """
)


@pytest.fixture()
def model_folder(tmp_path, tiny_config, processor):
    torch.manual_seed(3)
    model = OpenQwen2VLForConditionalGeneration(tiny_config).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model


def test_model_release_dry_run_builds_a_loadable_repo(tmp_path, model_folder, processor):
    folder, model = model_folder
    table = tmp_path / "eval.md"
    table.write_text("| benchmark | accuracy |\n|---|---|\n| easy_vqa | 0.81 |\n")
    staging = tmp_path / "staging"
    assert main(["model", str(folder), "--repo-id", "org/tiny-open-qwen2vl", "--staging", str(staging),
                 "--eval-table", str(table), "--dry-run"]) == 0
    card = (staging / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text")
    assert "| easy_vqa | 0.81 |" in card and 'from_pretrained("org/tiny-open-qwen2vl", trust_remote_code=True)' in card
    for name in ("model.safetensors", "config.json", "modeling_open_qwen2vl.py", "processor_config.json",
                 "generation_config.json", "chat_template.jinja"):
        assert (staging / name).is_file(), name
    result = subprocess.run([sys.executable, "-c", LOAD_MODEL, str(staging)], capture_output=True, text=True,
                            check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    ids = processor(text="<s>hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0, -1, :20].tolist()
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_incomplete_model_folder_is_refused(tmp_path, model_folder, capsys):
    folder, _ = model_folder
    (folder / "modeling_open_qwen2vl.py").unlink()
    assert main(["model", str(folder), "--repo-id", "org/x", "--dry-run"]) == 2
    assert "missing: modeling_open_qwen2vl.py" in capsys.readouterr().err


def _write_shard(path, captions):
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            buf = io.BytesIO()
            Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                              ("json", json.dumps({"uid": f"{i:032x}", "caption": caption}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _corpus(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "ccs").mkdir(parents=True)
    _write_shard(folder / "ccs" / "00000.tar", ["a red circle", "a blue square"])
    _write_shard(folder / "ccs" / "00001.tar", ["a green triangle"])
    (folder / "stats.json").write_text(json.dumps({"read": 3, "kept": 3}))
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: ccs\n  data_files:\n  - split: train\n    path: ccs/*.tar\n---\n# corpus\n")
    return folder


def test_dataset_release_dry_run_loads_with_load_dataset(tmp_path):
    folder = _corpus(tmp_path)
    staging = tmp_path / "ds-staging"
    assert main(["dataset", str(folder), "--repo-id", "org/corpus", "--staging", str(staging), "--dry-run"]) == 0
    assert (staging / "stats.json").is_file() and (staging / "ccs" / "00001.tar").is_file()
    result = subprocess.run([sys.executable, "-c", LOAD_DATASET, str(staging), "ccs"], capture_output=True,
                            text=True, check=True,
                            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                 "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")})
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {"rows": 3, "captions": ["a blue square", "a green triangle", "a red circle"], "size": [12, 10]}


def test_dataset_card_whose_config_matches_no_file_is_refused(tmp_path):
    folder = _corpus(tmp_path)
    card = folder / "README.md"
    card.write_text(card.read_text().replace("ccs/*.tar", "missing/*.tar"))
    with pytest.raises(ReleaseError, match=r"config 'ccs': pattern 'missing/\*.tar' matches no file"):
        build_dataset_repo(folder, tmp_path / "s")


def test_upload_refuses_offline_or_without_token(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ReleaseError, match="HF_HUB_OFFLINE is set"):
        upload(tmp_path, "org/x", "model", private=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ReleaseError, match="no Hugging Face token found"):
        upload(tmp_path, "org/x", "model", private=False)
