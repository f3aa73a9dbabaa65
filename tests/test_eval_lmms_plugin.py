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


@pytest.mark.slow
def test_two_processes_score_what_one_process_does(task_setup, evaluation, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU): lmms-eval shards the docs over the ranks, pads the shorter
    shard and counts requests on `lm.device`; every doc's answer is the one a single process gives."""
    import json
    import os
    import socket
    import subprocess

    root = task_setup[0]
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "two_processes.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port),
               str(TASK_FIXTURE / "evaluate_on_processes.py"), str(root / "model"), str(root / "tasks"), "3",
               str(output)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):  # freed at exit by the plugin: a gloo group left to the C++ teardown can abort a rank
        assert json.loads(Path(f"{output}.exit-{rank}").read_text()) == {"initialized": False}
    two = json.loads(output.read_text())
    for task, samples in evaluation["samples"].items():
        one = {str(s["doc_id"]): s["resps"] for s in samples}
        assert sorted(two["samples"][task]) == sorted(one)  # every doc scored once, none lost to the sharding
        for doc_id, resps in one.items():
            if task.endswith("choice"):
                assert [r[0][0] for r in two["samples"][task][doc_id]] == pytest.approx([r[0][0] for r in resps],
                                                                                         abs=1e-4)
                assert [r[0][1] for r in two["samples"][task][doc_id]] == [r[0][1] for r in resps]
            else:
                assert two["samples"][task][doc_id] == resps
    assert two["results"]["open_qwen2vl_fixture_choice"]["acc,none"] == pytest.approx(
        evaluation["results"]["open_qwen2vl_fixture_choice"]["acc,none"])


def _request(kind: str, args: tuple):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": args[3], "repeats": 1})


@pytest.fixture(scope="module")
def direct_lm(task_setup):
    """The plugin with in-memory docs of task "t": doc 0 one image, doc 1 two images, doc 2 none."""
    from PIL import Image

    from recipes.evaluation.lmms_eval_plugin import OpenQwen2VLLmms

    lm = OpenQwen2VLLmms(pretrained=str(task_setup[0] / "model"), batch_size=2)
    images = [Image.new("RGB", (40, 30), color) for color in ("red", "blue", "green")]
    lm.task_dict = {"t": {"test": {0: {"images": images[:1]}, 1: {"images": images[1:]}, 2: {"images": []}}}}
    return lm


def _visuals(doc):
    return doc["images"]


def _direct_scores(lm, context: str, continuation: str, images: list) -> tuple[float, bool, int]:
    """(sum of the continuation's log-probs, whether each token is the argmax, token count) from one forward pass."""
    processor = lm.processor
    prompt = chat_prompt_text(processor, "<image>\n" * len(images) + context)
    inputs = processor(text=prompt, images=[i.convert("RGB") for i in images] or None, return_tensors="pt")
    target = processor.tokenizer.encode(continuation, add_special_tokens=False)
    ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
    extra = {"pixel_values": inputs["pixel_values"]} if images else {}
    with torch.no_grad():
        log_probs = torch.log_softmax(lm.model(input_ids=ids, **extra).logits[0].float(), -1)
    start = inputs["input_ids"].shape[1] - 1
    rows = [log_probs[start + j] for j in range(len(target))]
    is_greedy = all(int(row.argmax()) == t for row, t in zip(rows, target))
    return sum(row[t].item() for row, t in zip(rows, target)), is_greedy, len(target)


def chat_prompt_text(processor, text):
    message = {"role": "user", "content": text}
    return processor.apply_chat_template([message], add_generation_prompt=True, tokenize=False)


def _greedy_continuation(lm, context: str, images: list) -> str:
    """The model's own greedy tokens after the prompt, decoded: the longest run of the first three whose text
    tokenizes back to them (a continuation is scored as its own tokenization)."""
    tokenizer = lm.processor.tokenizer
    inputs = lm.processor(text=chat_prompt_text(lm.processor, "<image>\n" * len(images) + context),
                          images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**inputs, do_sample=False, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return next(text for n in range(len(tokens), 0, -1)
                if tokenizer.encode(text := tokenizer.decode(tokens[:n]), add_special_tokens=False) == tokens[:n])


def test_loglikelihood_matches_the_logits_with_no_one_and_two_images_and_empty_context(direct_lm):
    """Losses in request order against a direct forward pass, in padded batches mixing image counts; the model's
    own greedy tokens are `is_greedy`."""
    docs = direct_lm.task_dict["t"]["test"]
    contexts = {0: "What colour?", 1: "Compare them.", 2: ""}  # doc 2: no image and an empty context
    greedy = {d: _greedy_continuation(direct_lm, c, docs[d]["images"]) for d, c in contexts.items()}
    cases = [(context, continuation, doc_id) for doc_id, context in contexts.items()
             for continuation in (" red", greedy[doc_id], greedy[doc_id] + " no")]
    requests = [_request("loglikelihood", (c, t, _visuals, d, "t", "test")) for c, t, d in cases]
    responses = [response.text for response in direct_lm.loglikelihood(requests)]
    for (context, continuation, doc_id), (loss, is_greedy) in zip(cases, responses):
        total, expected_greedy, length = _direct_scores(direct_lm, context, continuation, docs[doc_id]["images"])
        assert loss == pytest.approx(-total / length, abs=1e-4)
        assert is_greedy == expected_greedy
    assert all(is_greedy for _, is_greedy in responses[1::3])


def test_requests_are_read_in_chunks_and_answered_in_request_order(direct_lm, monkeypatch):
    """lmms-eval hands every request of a run in one call: images are read a few batches at a time, not all at
    once, and answers still come back in request order across generation settings."""
    from recipes.evaluation import lmms_eval_plugin

    requests = [_request("generate_until", (f"Question {i}?", {"max_new_tokens": 2 + i % 2, "until": ["\n"]},
                                            _visuals, i % 3, "t", "test")) for i in range(9)]
    alone = [direct_lm.generate_until([r])[0] for r in requests]
    scored = [_request("loglikelihood", (f"Question {i}?", " yes", _visuals, i % 3, "t", "test")) for i in range(9)]
    scored_alone = [direct_lm.loglikelihood([r])[0].text for r in scored]

    # batch_size 2: at most 4 requests' images at a time (raising=False: the old plugin had no such setting)
    monkeypatch.setattr(lmms_eval_plugin, "BATCHES_PER_CHUNK", 2, raising=False)
    calls = []
    for method in ("generate", "continuation_scores"):
        original = getattr(direct_lm.predictor, method)
        monkeypatch.setattr(direct_lm.predictor, method,
                            lambda prompts, *rest, _run=original: calls.append(len(prompts)) or _run(prompts, *rest))
    assert direct_lm.generate_until(requests) == alone
    assert max(calls) == 4 and sum(calls) == 9
    calls.clear()
    together = [r.text for r in direct_lm.loglikelihood(scored)]
    assert [loss for loss, _ in together] == pytest.approx([loss for loss, _ in scored_alone], abs=1e-4)
    assert [is_greedy for _, is_greedy in together] == [is_greedy for _, is_greedy in scored_alone]
    assert calls == [4, 4, 1]


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buffer, "PNG")
    return buffer.getvalue()


def _corrupt_image_docs(where: str) -> tuple[dict, object]:
    """Docs 0 (a good image) and 1 (bytes no decoder reads), and the task's doc_to_visual: the dataset decodes the
    image when the doc is read ("dataset") or the task's function opens it ("doc_to_visual")."""
    import io

    import datasets
    from PIL import Image

    good, bad = _png_bytes(), b"not an image at all"
    if where == "dataset":
        rows = datasets.Dataset.from_dict({"image": [{"bytes": good, "path": None}, {"bytes": bad, "path": None}]})
        return rows.cast_column("image", datasets.Image()), lambda doc: [doc["image"]]
    return {0: {"data": good}, 1: {"data": bad}}, lambda doc: [Image.open(io.BytesIO(doc["data"]))]


@pytest.mark.parametrize("where", ["dataset", "doc_to_visual"])
@pytest.mark.parametrize("kind", ["generate_until", "loglikelihood"])
def test_a_corrupt_image_fails_naming_its_doc(direct_lm, monkeypatch, kind, where):
    """(A truncated file is no such case under lmms-eval: importing it sets PIL's LOAD_TRUNCATED_IMAGES.)"""
    from PIL import UnidentifiedImageError

    docs, doc_to_visual = _corrupt_image_docs(where)
    monkeypatch.setitem(direct_lm.task_dict, "c", {"test": docs})
    second = {"max_new_tokens": 2} if kind == "generate_until" else " yes"
    requests = [_request(kind, (f"Doc {i}?", second, doc_to_visual, i, "c", "test")) for i in (0, 1)]
    with pytest.raises(ValueError, match=r"open_qwen2vl cannot read the images of task c split test doc 1: "
                                         r"UnidentifiedImageError: cannot identify image file") as caught:
        getattr(direct_lm, kind)(requests)
    assert isinstance(caught.value.__cause__, UnidentifiedImageError)  # the decoder's own error stays chained


def test_an_empty_continuation_fails_naming_its_doc(direct_lm):
    requests = [_request("loglikelihood", ("Colour?", " red", _visuals, 0, "t", "test")),
                _request("loglikelihood", ("Colour?", "", _visuals, 2, "t", "test"))]
    with pytest.raises(ValueError, match=r"open_qwen2vl: task t split test doc 2 has an empty continuation \(''\)"):
        direct_lm.loglikelihood(requests)


def test_decoding_settings_it_cannot_honour_are_warned_once_per_task(direct_lm, caplog):
    settings = {"max_new_tokens": 2, "num_beams": 3, "temperature": 0, "do_sample": False}
    requests = [_request("generate_until", ("Colour?", dict(settings), _visuals, i, "t", "test")) for i in range(3)]
    greedy = [direct_lm.generate_until([_request("generate_until", ("Colour?", {"max_new_tokens": 2}, _visuals, i,
                                                                     "t", "test"))])[0] for i in range(3)]
    caplog.clear()
    with caplog.at_level("WARNING", logger="recipes.evaluation.lmms_eval_plugin"):
        assert direct_lm.generate_until(requests) == greedy  # still greedy, one beam
    warnings = [r.getMessage() for r in caplog.records if r.name == "recipes.evaluation.lmms_eval_plugin"]
    assert warnings == ["open_qwen2vl decodes greedily with one beam; ignoring num_beams of task t"]


def test_clean_releases_the_model(task_setup):
    """lmms-eval calls `clean()` after the requests to free the accelerator (for a local judge model, say)."""
    import gc
    import weakref

    from recipes.evaluation.lmms_eval_plugin import OpenQwen2VLLmms

    lm = OpenQwen2VLLmms(pretrained=str(task_setup[0] / "model"))
    model = weakref.ref(lm.model)
    device = next(lm.model.parameters()).device
    lm.clean()
    gc.collect()
    assert model() is None
    assert lm.device == device  # the evaluator may still ask (it synchronises the processes after cleaning)


@pytest.mark.parametrize(
    "requested, processes, expected",
    [
        (None, 2, "cuda:1"),  # nothing asked: accelerate's device for this process
        ("cuda", 2, "cuda:1"),  # several processes: this process's GPU, not GPU 0 for all
        ("cuda:0", 2, "cuda:0"),  # an explicit index is the user's choice
        ("cuda", 1, "cuda"),  # one process: as asked
        ("cpu", 2, "cpu"),  # another device type than the processes': as asked
    ],
)
def test_device_without_an_index_means_this_processs_gpu(requested, processes, expected):
    from types import SimpleNamespace

    from recipes.evaluation.lmms_eval_plugin import process_device

    accelerator = SimpleNamespace(device=torch.device("cuda", 1), num_processes=processes)
    assert process_device(requested, accelerator) == torch.device(expected)
