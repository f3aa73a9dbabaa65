"""score clip / score mlm-filter: values against direct transformers computations, prompts, parsing, accounting."""

import hashlib
import io
import os
import random

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dataset_builders.mlm_filter_prompts import CRITERIA, METRICS, TEMPLATES, build_instruction, parse_score
from dataset_builders.pipelines import ExecutorConfig, run_score
from dataset_builders.shards import Sample, iter_samples, list_shards
from dataset_builders.steps.clip_score import ClipScorer
from dataset_builders.steps.mlm_filter import MLMFilterScorer
from dataset_builders.steps.scoring import resolve_device, resolve_dtype
from dataset_builders.synthetic import damaged_shard_members, save_tiny_clip, write_clean_shards, write_shard


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_clean_shards(str(folder), num_shards=2, per_shard=6, seed=21)
    members, expected = damaged_shard_members(random.Random(22))
    write_shard(str(folder / "00002.tar"), members)
    return str(folder)


# usable samples of the fixture: 12 clean + the damaged shard's "ok" ones (odd modes are converted, not dropped)
USABLE = 12 + sum(r == "ok" for r in damaged_shard_members(random.Random(22))[1].values())


def _samples(folder):
    return [s for shard in list_shards(folder) for s in iter_samples(folder, shard) if isinstance(s, Sample)]


def _scores(folder):
    rows = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".parquet"):
            rows.update({r["uid"]: r for r in pq.read_table(os.path.join(folder, name)).to_pylist()})
    return rows


def test_clip_scores_equal_a_direct_transformers_forward(tiny_clip, shards, tmp_path):
    from transformers import AutoModel, AutoProcessor

    accounting = run_score(shards, str(tmp_path / "scores"), ClipScorer(tiny_clip, batch_size=4))
    scores = _scores(tmp_path / "scores")
    model, processor = AutoModel.from_pretrained(tiny_clip).eval(), AutoProcessor.from_pretrained(tiny_clip)
    checked = 0
    for sample in _samples(shards):
        if sample.uid not in scores:
            continue
        image = Image.open(io.BytesIO(sample.image)).convert("RGB")
        inputs = processor(text=[sample.caption], images=[image], padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)  # CLIPModel.forward normalises both embeddings
        expected = float((out.image_embeds * out.text_embeds).sum())
        mode = Image.open(io.BytesIO(sample.image)).mode
        tolerance = 1e-5 if mode in ("RGB", "L") else 0.05  # odd modes: the kit composites alpha / scales 16-bit
        assert scores[sample.uid]["clip_score"] == pytest.approx(expected, abs=tolerance), sample.key
        checked += 1
    assert checked == accounting.kept == USABLE
    assert accounting.balanced and accounting.read == 12 + len(damaged_shard_members(random.Random(22))[1]) + 1
    assert sorted(os.listdir(tmp_path / "scores")) == [".datatrove", "00000.parquet", "00001.parquet", "00002.parquet"]


def test_a_failing_sample_is_isolated_from_its_batch(tiny_clip, shards, tmp_path):
    class Fussy(ClipScorer):
        def score_batch(self, images, captions):
            if any("hexagon" in c for c in captions):
                raise ValueError("cannot score hexagons")
            return super().score_batch(images, captions)

    reference = run_score(shards, str(tmp_path / "ref"), ClipScorer(tiny_clip, batch_size=4))
    fussy = run_score(shards, str(tmp_path / "fussy"), Fussy(tiny_clip, batch_size=4))
    hexagons = {s.uid for s in _samples(shards) if "hexagon" in s.caption}
    assert hexagons and fussy.dropped["score_error"] == len(hexagons & set(_scores(tmp_path / "ref")))
    assert fussy.kept == reference.kept - fussy.dropped["score_error"] and fussy.balanced
    ref, got = _scores(tmp_path / "ref"), _scores(tmp_path / "fussy")
    assert set(got) == set(ref) - hexagons
    assert all(got[u]["clip_score"] == pytest.approx(ref[u]["clip_score"], abs=1e-6) for u in got)


def test_an_extremely_elongated_image_is_a_counted_drop_before_the_scorer(tiny_clip, tmp_path):
    """CLIP keeps the aspect ratio when it resizes: a 1 x N image would be blown up to 224 x 224N pixels."""
    from dataset_builders.synthetic import encode, sample_members

    folder = tmp_path / "thin"
    folder.mkdir()
    thin = encode(Image.new("RGB", (1, 150), "red"), "PNG")  # 150:1
    banner = encode(Image.new("RGB", (20, 150), "blue"), "PNG")  # 7.5:1, an ordinary odd shape
    write_shard(str(folder / "00000.tar"), sample_members("thin", thin, "a red line", {}, "png")
                + sample_members("banner", banner, "a blue banner", {}, "png"))
    result = run_score(str(folder), str(tmp_path / "scores"), ClipScorer(tiny_clip, batch_size=4))
    assert dict(result.dropped) == {"image_aspect_ratio": 1} and result.kept == 1 and result.balanced
    banner_uid = next(s.uid for s in _samples(str(folder)) if s.key == "banner")
    assert set(_scores(tmp_path / "scores")) == {banner_uid}


def test_rerun_of_a_finished_score_stage_does_nothing(tiny_clip, shards, tmp_path):
    out = tmp_path / "scores"
    run_score(shards, str(out), ClipScorer(tiny_clip, batch_size=8))
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.endswith(".parquet")}
    again = run_score(shards, str(out), ClipScorer(tiny_clip, batch_size=3))  # batch size may change on resume
    assert {n: os.stat(out / n).st_mtime_ns for n in before} == before
    assert again.tasks == 3 and again.balanced
    with pytest.raises(ValueError, match="different settings"):
        run_score(shards, str(out), ClipScorer(tiny_clip, column="other"))


def test_a_mistyped_model_does_not_lock_the_output(tiny_clip, shards, tmp_path):
    out = tmp_path / "scores"
    with pytest.raises(OSError, match="clip_typo"):  # every task fails loading it; settings are already recorded
        run_score(shards, str(out), ClipScorer(str(tmp_path / "clip_typo"), batch_size=8))
    assert (out / ".datatrove" / "score" / "settings.json").exists()
    accounting = run_score(shards, str(out), ClipScorer(tiny_clip, batch_size=8))  # the corrected command runs
    assert accounting.kept == len(_scores(out)) == USABLE and accounting.tasks == 3


@pytest.mark.slow
def test_two_local_workers_give_the_same_scores(tiny_clip, shards, tmp_path):
    run_score(shards, str(tmp_path / "one"), ClipScorer(tiny_clip, batch_size=4))
    run_score(shards, str(tmp_path / "two"), ClipScorer(tiny_clip, batch_size=4), ExecutorConfig(workers=2))
    one, two = _scores(tmp_path / "one"), _scores(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(one[u]["clip_score"] == pytest.approx(two[u]["clip_score"], abs=1e-6) for u in one)


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") is torch.float32 and resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8x'"):
        resolve_dtype("fp8x", "cpu")


# -- MLM-Filter -------------------------------------------------------------------------------------------------

# sha256 of the strings as written in Victorwz/MLM_Filter (mlm_filter_scoring_datacomp_batch_inference_v2.py for
# "qwen", ..._llama_3.py for "llama3"), computed from that repository's text, not from the kit's constants.
PROMPT_SHA256 = {
    "image_text_matching": "a5dbc19a309b9fda", "object_detail_fulfillment": "8cd5119eedb635aa",
    "caption_text_quality": "1382b4e31bd7e8fa", "semantic_understanding": "d0c189ca02f04313",
    "qwen": "14d307d85a274b91", "llama3": "9cf6924f068430c7",
}


def test_prompts_are_the_ones_the_mlm_filter_models_were_trained_on():
    texts = {**CRITERIA, **TEMPLATES}
    assert {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in texts.items()} == PROMPT_SHA256
    text = build_instruction("A dog.", "semantic_understanding")
    assert text.startswith("Text Caption: A dog.\n\nEvaluate the given text caption")
    assert "higher level of semantic understanding. Ensure" in text and text.endswith("avoiding any potential bias.")
    with pytest.raises(ValueError, match="unknown MLM-Filter metric 'beauty'"):
        build_instruction("x", "beauty")


@pytest.mark.parametrize("answer, score", [
    ("85", 85), (" 85\nThe caption adds ...", 85), ("100", 100), ("0", 0), ("7.", 7), ("42,", 42),
    ("101", None), ("85/100", None), ("Score: 85", None), ("eighty", None), ("", None), ("\n85", 85),
    ("8 5", None), ("-3", None), ("85.5", None),
])
def test_parse_score_on_hand_written_answers(answer, score):
    assert parse_score(answer) == score


def _independently_parsable(raw: str) -> bool:
    line = raw.strip().split("\n")[0].strip().rstrip(".,;:").strip()
    return line.isdigit() and len(line) <= 3 and int(line) <= 100


@pytest.fixture(scope="module")
def tiny_kit_checkpoint(tmp_path_factory, tiny_model, processor):
    folder = str(tmp_path_factory.mktemp("kit"))
    tiny_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_mlm_filter_with_the_kits_tiny_model_counts_unparsable_answers(tiny_kit_checkpoint, shards, tmp_path):
    # The random model's answers are (as far as seen) all unparsable, so the parsed branch below may not run here:
    # test_mlm_filter_real_generation_of_parsable_and_unparsable_answers runs both branches with known answers.
    metrics = ("semantic_understanding", "caption_text_quality")
    scorer = MLMFilterScorer(tiny_kit_checkpoint, metrics=metrics, batch_size=4, max_new_tokens=3)
    accounting = run_score(shards, str(tmp_path / "mlm"), scorer)
    rows = _scores(tmp_path / "mlm")
    assert len(rows) == accounting.kept == USABLE and accounting.balanced
    for metric in metrics:
        raws = [r[f"{metric}_raw"] for r in rows.values()]
        unparsable = sum(not _independently_parsable(raw) for raw in raws)
        assert accounting.events.get(f"unparsable/{metric}", 0) == unparsable
        for row in rows.values():
            raw, score = row[f"{metric}_raw"], row[f"{metric}_score"]
            assert (score is None) == (not _independently_parsable(raw))
            if score is not None:
                assert score == int(raw.strip().split("\n")[0].strip().rstrip(".,;:"))


# A kit checkpoint that answers on purpose. Its decoder blocks write nothing back (o_proj / down_proj zeroed, layer
# 0's attention excepted), so the residual stream at a position is that token's embedding, and the untied LM head
# reads it through one-hot dimensions: the prompt's last token -> "8" -> "5" -> end of turn, i.e. "85". Layer 0 has
# two hand-set attention heads, one that fires when a chosen caption word is anywhere in the prompt and one for a
# word only one metric's instruction has; their flags turn the first answer token into "!" (then end of turn, an
# unparsable answer) and "9" (then "7", end of turn: "97"). The answers are thus fixed by the prompt text alone.
_START, _EIGHT, _FIVE, _NINE, _SEVEN, _BANG, _CAPTION_WORD, _METRIC_WORD, _CAPTION_FLAG, _METRIC_FLAG = range(10)


def _scripted_kit_checkpoint(source: str, folder: str, *, last_prompt_token: int, end_token: int,
                             caption_word: int, metric_word: int) -> str:
    """Re-weights the checkpoint in ``source`` (saved with its processor into ``folder``) as described above."""
    from transformers import AutoProcessor

    from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration

    model = OpenQwen2VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoProcessor.from_pretrained(source).tokenizer
    digit = {d: tokenizer.convert_tokens_to_ids(d) for d in "8597"}
    bang = tokenizer.convert_tokens_to_ids("!")
    text = model.model.language_model
    hidden, head_dim = text.config.hidden_size, text.layers[0].self_attn.head_dim
    kv_heads, q_heads = text.config.num_key_value_heads, text.config.num_attention_heads
    assert head_dim >= 2 and kv_heads >= 2 and q_heads % kv_heads == 0 and hidden > _METRIC_FLAG
    slow = head_dim // 2 - 1  # rotary pairs (i, i + head_dim/2): the last i turns slowest (< 0.3 rad over a prompt)
    q_per_kv = q_heads // kv_heads
    # Untie the LM head from the embedding (the tiny config ties them).
    model.config.tie_word_embeddings = False
    model.config.text_config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(text.config.vocab_size, hidden))
    with torch.no_grad():
        embed = text.embed_tokens.weight
        embed[:, : _METRIC_FLAG + 1] = 0  # no other token (nor image feature) touches the scripted dimensions
        rows = {last_prompt_token: _START, digit["8"]: _EIGHT, digit["5"]: _FIVE, digit["9"]: _NINE,
                digit["7"]: _SEVEN, bang: _BANG, caption_word: _CAPTION_WORD, metric_word: _METRIC_WORD}
        assert len(rows) == 8 and end_token not in rows, "scripted tokens must be distinct"
        for token, dim in rows.items():
            embed[token] = 0
            embed[token, dim] = 1.0
        projector = model.model.multi_modal_projector.linear_2
        projector.weight[: _METRIC_FLAG + 1] = 0
        projector.bias[: _METRIC_FLAG + 1] = 0
        for layer in text.layers:
            layer.mlp.down_proj.weight.zero_()
            attention = layer.self_attn
            for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
            layer.input_layernorm.weight.fill_(1.0)
        text.norm.weight.fill_(1.0)
        attention = text.layers[0].self_attn
        # After RMSNorm a one-hot embedding is sqrt(hidden) = 8 in its dimension: scores 4 * 64 / 4 = 64 on the
        # word's position, 0 elsewhere (softmax weight ~1 on the word); without the word the head reads zeros.
        for kv_head, (word, flag) in enumerate([(_CAPTION_WORD, _CAPTION_FLAG), (_METRIC_WORD, _METRIC_FLAG)]):
            q_head = kv_head * q_per_kv
            attention.q_proj.weight[q_head * head_dim + slow, _START] = 2.0  # only the answer's start asks
            attention.k_proj.weight[kv_head * head_dim + slow, word] = 2.0
            attention.v_proj.weight[kv_head * head_dim, word] = 1.0
            attention.o_proj.weight[flag, q_head * head_dim] = 0.25  # flag = 2 in the residual, twice the start
        head = model.lm_head.weight
        head[digit["8"], _START] = 1.0
        head[digit["9"], _METRIC_FLAG] = 1.0  # start + metric flag: "9" (2) beats "8" (1)
        head[bang, _CAPTION_FLAG] = 2.0  # start + caption flag: "!" (4) beats both
        head[digit["5"], _EIGHT] = 1.0
        head[digit["7"], _NINE] = 1.0
        head[end_token, [_FIVE, _SEVEN, _BANG]] = 1.0
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(source).save_pretrained(folder)
    return folder


def test_mlm_filter_real_generation_of_parsable_and_unparsable_answers(tiny_kit_checkpoint, shards, tmp_path):
    """The whole path (prompt, processor, generate, decode, parse, count) with answers known in advance."""
    from transformers import AutoModelForImageTextToText

    probe = MLMFilterScorer(tiny_kit_checkpoint, metrics=("semantic_understanding",), device="cpu")
    probe.setup(0)
    tokenizer = probe._processor.tokenizer
    (caption_word,) = tokenizer(" ellipse", add_special_tokens=False).input_ids
    (metric_word,) = tokenizer(" Vocabulary", add_special_tokens=False).input_ids
    prompt_ids = {(caption, metric): tokenizer(probe.prompt(caption, metric)).input_ids
                  for caption in ("a grey ellipse on the beach", "a red square in a field")
                  for metric in ("semantic_understanding", "caption_text_quality")}
    (last_prompt_token,) = {ids[-1] for ids in prompt_ids.values()}  # the " " after "<|im_start|>assistant\n"
    for (caption, metric), ids in prompt_ids.items():  # each trigger word is where the construction expects it
        assert (caption_word in ids) == ("ellipse" in caption)
        assert (metric_word in ids) == (metric == "caption_text_quality")
    end_token = probe._model.generation_config.eos_token_id
    assert end_token == tokenizer.convert_tokens_to_ids("<|im_end|>")  # generation stops at the end of the turn
    folder = _scripted_kit_checkpoint(tiny_kit_checkpoint, str(tmp_path / "scripted"),
                                      last_prompt_token=last_prompt_token, end_token=end_token,
                                      caption_word=caption_word, metric_word=metric_word)
    reloaded = AutoModelForImageTextToText.from_pretrained(folder)
    assert not torch.equal(reloaded.lm_head.weight, reloaded.get_input_embeddings().weight)  # stayed untied

    metrics = ("semantic_understanding", "caption_text_quality")
    scorer = MLMFilterScorer(folder, metrics=metrics, batch_size=4, device="cpu")  # default 4 new tokens
    accounting = run_score(shards, str(tmp_path / "mlm"), scorer)
    rows = _scores(tmp_path / "mlm")
    assert len(rows) == accounting.kept == USABLE and accounting.balanced
    captions = {s.uid: s.caption for s in _samples(shards)}
    ellipses = {uid for uid in rows if "ellipse" in captions[uid]}
    assert 0 < len(ellipses) < len(rows)  # both branches run
    expected = {"semantic_understanding": ("85", 85), "caption_text_quality": ("97", 97)}
    for uid, row in rows.items():
        for metric in metrics:
            want = ("!", None) if uid in ellipses else expected[metric]
            assert (row[f"{metric}_raw"], row[f"{metric}_score"]) == want, (captions[uid], metric)
    assert {m: accounting.events.get(f"unparsable/{m}", 0) for m in metrics} == {m: len(ellipses) for m in metrics}


def test_mlm_filter_prompt_and_scripted_answers_land_in_their_columns(tiny_kit_checkpoint, shards, tmp_path,
                                                                      monkeypatch):
    answers = iter(["85\nrich", "12", "a lot", "100.", "n/a", "7"] * 100)
    seen_prompts = []

    def scripted(self, images, prompts):
        seen_prompts.extend(prompts)
        return [next(answers) for _ in prompts]

    monkeypatch.setattr(MLMFilterScorer, "generate", scripted)
    scorer = MLMFilterScorer(tiny_kit_checkpoint, metrics=("semantic_understanding",), batch_size=6)
    accounting = run_score(shards, str(tmp_path / "mlm"), scorer, ExecutorConfig(tasks=1))
    table = pq.read_table(tmp_path / "mlm" / "00000.parquet").to_pylist()
    assert [(r["semantic_understanding_raw"], r["semantic_understanding_score"]) for r in table] == [
        ("85\nrich", 85), ("12", 12), ("a lot", None), ("100.", 100), ("n/a", None), ("7", 7)]
    pattern = ["85\nrich", "12", "a lot", "100.", "n/a", "7"]  # answers cycle over all samples in order
    assert accounting.events["unparsable/semantic_understanding"] == sum(
        pattern[i % 6] in ("a lot", "n/a") for i in range(USABLE))
    first = _samples(shards)[0]
    prompt = seen_prompts[0]
    assert prompt.endswith("<|im_start|>assistant\n ")  # the original decodes after one space
    instruction = build_instruction(first.caption, "semantic_understanding")
    assert f"<|im_start|>user\n<image>\n{instruction}<|im_end|>" in prompt


def test_a_caption_quoting_the_image_marker_is_scored(tiny_kit_checkpoint):
    from PIL import Image

    scorer = MLMFilterScorer(tiny_kit_checkpoint, metrics=("semantic_understanding",), batch_size=2,
                             max_new_tokens=2, device="cpu")
    scorer.setup(0)
    caption = "a red square <image> tag left in the alt text"
    prompt = scorer.prompt(caption, "semantic_understanding")
    assert prompt.count("<image>") == 1 and "a red square <image-placeholder> tag" in prompt
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    (row,) = scorer.score_batch([image], [caption])  # one image, one marker: no error for this sample
    assert set(row) >= {"semantic_understanding_raw", "semantic_understanding_score"}


def test_mlm_filter_rejects_unknown_metrics():
    with pytest.raises(ValueError, match=r"unknown MLM-Filter metric\(s\) \['beauty'\]"):
        MLMFilterScorer("unused", metrics=("beauty",))
    assert set(METRICS) == {"image_text_matching", "object_detail_fulfillment", "caption_text_quality",
                            "semantic_understanding"}
