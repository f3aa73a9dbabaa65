"""The lmms-eval plugin on a local task fixture (lmms-eval is an optional extra: skipped when not installed)."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (pip install --no-deps lmms-eval)")

from modeling_open_qwen2vl import build_processor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.eval import lively_tiny_model  # noqa: E402

TASK_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "eval" / "lmms_task"
KINDS = {"shape": ["circle", "rectangle", "triangle"], "yes/no": ["yes", "no"],
         "color": ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"]}


@pytest.fixture(scope="module")
def task_setup(tmp_path_factory):
    import datasets
    import easy_vqa

    root = tmp_path_factory.mktemp("lmms")
    model = lively_tiny_model()
    processor = build_processor(model.config)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    rows = {
        "question": list(questions[:5]),
        "answer": list(answers[:5]),
        "choices": [next(c for c in KINDS.values() if a in c) for a in answers[:5]],
        "image": [paths[i] for i in image_ids[:5]],
    }
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(root / "data"))
    tasks = root / "tasks"
    tasks.mkdir()
    shutil.copy(TASK_FIXTURE / "utils.py", tasks / "utils.py")
    for name in ("fixture_generate.yaml", "fixture_choice.yaml"):
        text = (TASK_FIXTURE / name).read_text().replace("{data_dir}", str(root / "data"))
        (tasks / name).write_text(text)
    return root, model, processor, dataset


@pytest.fixture(scope="module")
def evaluation(task_setup):
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from recipes.evaluation.lmms_eval_manifest import register

    root = task_setup[0]
    register()
    manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
    return evaluator.simple_evaluate(
        model="open_qwen2vl", model_args=f"pretrained={root / 'model'},batch_size=3",
        tasks=["open_qwen2vl_fixture_generate", "open_qwen2vl_fixture_choice"], task_manager=manager,
        log_samples=True,
    )


def test_manifest_resolves_the_model_name_and_alias():
    from lmms_eval.models import MODEL_REGISTRY_V2

    from recipes.evaluation.lmms_eval_manifest import register
    from recipes.evaluation.lmms_eval_plugin import OpenQwen2VLLmms

    register()
    for name in ("open_qwen2vl", "open-qwen2vl"):
        assert MODEL_REGISTRY_V2.get_model_class(name) is OpenQwen2VLLmms


def chat_prompt(processor, text):
    message = [{"role": "user", "content": f"<image>\n{text}"}]
    return processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)


@pytest.mark.slow
def test_multiple_choice_task_matches_a_manual_forward_pass(task_setup, evaluation):
    _, model, processor, dataset = task_setup
    samples = evaluation["samples"]["open_qwen2vl_fixture_choice"]
    assert len(samples) == 5
    hits = []
    for sample in samples:
        doc = dataset[sample["doc_id"]]
        inputs = processor(text=chat_prompt(processor, f"Question: {doc['question']}\nAnswer:"),
                           images=[doc["image"].convert("RGB")], return_tensors="pt")
        expected = []
        for choice in doc["choices"]:
            target = processor.tokenizer.encode(" " + choice, add_special_tokens=False)  # lmms-eval's delimiter
            ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0], -1)
            start = inputs["input_ids"].shape[1]
            # lmms-eval's convention: mean negative log-likelihood per continuation token (a loss; argmin wins)
            expected.append(-sum(log_probs[start - 1 + j, t].item() for j, t in enumerate(target)) / len(target))
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(expected, abs=1e-4)
        hits.append(int(min(range(len(got)), key=got.__getitem__) == sample["target"]))
    assert evaluation["results"]["open_qwen2vl_fixture_choice"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


@pytest.mark.slow
def test_generation_task_matches_plain_generate(task_setup, evaluation):
    _, model, processor, dataset = task_setup
    samples = evaluation["samples"]["open_qwen2vl_fixture_generate"]
    assert len(samples) == 5
    for sample in samples:
        doc = dataset[sample["doc_id"]]
        text = f"{doc['question']}\nAnswer the question using a single word or phrase."
        inputs = processor(text=chat_prompt(processor, text), images=[doc["image"].convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=6,
                                 eos_token_id=processor.tokenizer.eos_token_id,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        generated = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert sample["filtered_resps"][0] == generated.strip().split("\n")[0]
    assert len({s["filtered_resps"][0] for s in samples}) > 1  # prompt-dependent answers, not one constant
    assert "exact_match,none" in evaluation["results"]["open_qwen2vl_fixture_generate"]


def test_unknown_model_argument_is_rejected(task_setup):
    from recipes.evaluation.lmms_eval_plugin import OpenQwen2VLLmms

    with pytest.raises(TypeError, match=r"open_qwen2vl got unknown model arguments \['temprature'\]"):
        OpenQwen2VLLmms(pretrained=str(task_setup[0] / "model"), temprature="0.5")


@pytest.mark.parametrize("extra, expected", [
    ({"batch_size": "1", "max_batch_size": 8, "device": None}, 1),  # max_batch_size only bounds "auto"
    ({"batch_size": "auto", "max_batch_size": None, "device": None}, 8),
    ({"batch_size": "auto:2", "max_batch_size": 3, "device": None}, 3),
])
def test_cli_batch_flags_reach_the_model(task_setup, extra, expected):
    """lmms-eval passes --batch_size and --max_batch_size to every model (create_from_arg_string drops None)."""
    from recipes.evaluation.lmms_eval_plugin import OpenQwen2VLLmms

    lm = OpenQwen2VLLmms.create_from_arg_string(f"pretrained={task_setup[0] / 'model'}", extra)
    assert lm.batch_size == expected
    assert lm.predictor.batch_size == expected


@pytest.mark.parametrize("extra, message", [
    ({"batch_size": "0"}, "batch_size must be an integer >= 1 or auto, got '0'"),
    ({"batch_size": "-2"}, "batch_size must be an integer >= 1 or auto, got '-2'"),
    ({"batch_size": "1.5"}, "batch_size must be an integer >= 1 or auto, got '1.5'"),
    ({"batch_size": "automatic"}, "batch_size must be an integer >= 1 or auto, got 'automatic'"),
    ({"batch_size": "auto", "max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
])
def test_bad_batch_sizes_fail_before_the_model_loads(extra, message):
    import re

    from recipes.evaluation.lmms_eval_plugin import OpenQwen2VLLmms

    # A folder that does not exist: loading it would raise OSError, so a ValueError shows the check came first.
    with pytest.raises(ValueError, match=re.escape(f"open_qwen2vl: {message}")):
        OpenQwen2VLLmms.create_from_arg_string("pretrained=/nonexistent/model", extra)


def test_entry_point_line_for_setup_cfg_is_picked_up_by_lmms_eval(tmp_path):
    """The packaging line `lmms_eval.models = open_qwen2vl = recipes.evaluation.lmms_eval_manifest:MANIFESTS`,
    declared by a distribution on the path, makes `--model open_qwen2vl` resolve in a fresh process."""
    import os
    import subprocess

    dist = tmp_path / "open_qwen2vl_kit_probe-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: open-qwen2vl-kit-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "[lmms_eval.models]\nopen_qwen2vl = recipes.evaluation.lmms_eval_manifest:MANIFESTS\n"
    )
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from lmms_eval.models import get_model\n"
        "print(get_model('open_qwen2vl').__module__, get_model('open-qwen2vl').__name__)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["recipes.evaluation.lmms_eval_plugin", "OpenQwen2VLLmms"]
