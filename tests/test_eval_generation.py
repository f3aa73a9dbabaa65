"""Batched inference on the tiny model: same predictions as one prompt at a time, numbers checked by hand."""

import pytest
import torch

from recipes.evaluation import Predictor
from recipes.evaluation.original_settings import ORIGINAL_STOP_TOKEN_IDS

# Different lengths and image counts, so batches really are left-padded (one prompt is text-only).
PROMPTS = [
    "<s><image>\nQuestion: what is the shape?\nAnswer the question using a single word or phrase.\nAnswer:",
    "<s><image>\nWhich colour?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    "\nAnswer:",
    "<s>The following are multiple choice questions about  Geometry.\n\nCompare <image>\n and <image>\n.\nAnswer:",
    "<s>What is 2 + 2?\nAnswer:",
    "<s><image>\nIs it red?\nAnswer:",
]


@pytest.fixture(scope="module")
def requests(easy_vqa_images):
    images = [[easy_vqa_images[0]], [easy_vqa_images[1]], [easy_vqa_images[2], easy_vqa_images[3]], [],
              [easy_vqa_images[1]]]
    return PROMPTS, images


def predictor(tiny_model, processor, batch_size):
    return Predictor(tiny_model, processor, batch_size=batch_size, show_progress=False)


def test_batched_generation_equals_one_at_a_time(tiny_model, processor, requests):
    prompts, images = requests
    stops = [processor.tokenizer.eos_token_id]  # never produced by chance early: every prompt runs 16 tokens
    single = predictor(tiny_model, processor, 1).generate(prompts, images, 16, stops)
    batched = predictor(tiny_model, processor, 4).generate(prompts, images, 16, stops)
    all_in_one = predictor(tiny_model, processor, 8).generate(prompts, images, 16, stops)
    assert single == batched == all_in_one
    assert len(set(single)) > 1  # the prompts do lead to different outputs


def test_generation_matches_plain_generate_and_stops_at_a_stop_token(tiny_model, processor, requests):
    prompts, images = requests
    inputs = processor(text=prompts[0], images=images[0], return_tensors="pt")
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    with torch.no_grad():
        reference = tiny_model.generate(**inputs, do_sample=False, max_new_tokens=6, eos_token_id=eos, pad_token_id=pad)
    new = reference[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(new) == 6  # the seeded tiny model does not emit <|im_end|> in its first 6 tokens
    full = predictor(tiny_model, processor, 2).generate(prompts[:1], images[:1], 6, [processor.tokenizer.eos_token_id])
    assert full == [processor.tokenizer.decode(new, skip_special_tokens=True).strip()]
    # Make the third generated token a stop token: generation ends right after it (it is kept, as in the original).
    stopped = predictor(tiny_model, processor, 2).generate(prompts[:1], images[:1], 6, [new[2]])
    expected = processor.tokenizer.decode(new[: new.index(new[2]) + 1], skip_special_tokens=True).strip()
    assert stopped == [expected]


def test_original_stop_ids_are_punctuation_and_newline_for_qwen(processor):
    tokenizer = processor.tokenizer
    assert [tokenizer.decode([i]) for i in (13, 11, 198)] == [".", ",", "\n"]
    assert {13, 11, 198} <= set(ORIGINAL_STOP_TOKEN_IDS)
    assert tokenizer.eos_token_id not in ORIGINAL_STOP_TOKEN_IDS  # <|im_end|> does not stop the original


def manual_last_logits(model, processor, prompt, images):
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0, -1].float()


def test_letter_probabilities_by_hand_and_batched(tiny_model, processor, requests):
    prompts, images = requests
    letters = ["A", "B", "C", "D"]
    ids = [processor.tokenizer.encode(letter, add_special_tokens=False)[0] for letter in letters]
    single = predictor(tiny_model, processor, 1).letter_probabilities(prompts, images, letters)
    batched = predictor(tiny_model, processor, 3).letter_probabilities(prompts, images, letters)
    for k, (prompt, imgs) in enumerate(zip(prompts, images)):
        probabilities = torch.softmax(manual_last_logits(tiny_model, processor, prompt, imgs), -1)[ids]
        expected = (probabilities / probabilities.sum()).tolist()
        assert single[k] == pytest.approx(expected, abs=1e-6)
        assert batched[k] == pytest.approx(expected, abs=1e-5)
        assert sum(batched[k]) == pytest.approx(1.0)


def test_continuation_log_likelihoods_by_hand_and_batched(tiny_model, processor, requests):
    prompts, images = requests
    continuations = [[" circle", " rectangle", " a long answer"], [" A", " B"], [" 2"], [" 4", " four"], [" yes"]]
    single = predictor(tiny_model, processor, 1).continuation_scores(prompts, images, continuations)
    batched = predictor(tiny_model, processor, 4).continuation_scores(prompts, images, continuations)
    tokenizer = processor.tokenizer
    for k, (prompt, imgs) in enumerate(zip(prompts, images)):
        prompt_ids = processor(text=prompt, images=imgs or None, return_tensors="pt")
        for c, text in enumerate(continuations[k]):
            target = tokenizer.encode(text, add_special_tokens=False)
            ids = torch.cat([prompt_ids["input_ids"], torch.tensor([target])], dim=1)
            kwargs = {"pixel_values": prompt_ids["pixel_values"]} if imgs else {}
            with torch.no_grad():
                log_probs = torch.log_softmax(tiny_model(input_ids=ids, **kwargs).logits[0].float(), -1)
            start = prompt_ids["input_ids"].shape[1]
            expected = sum(log_probs[start - 1 + j, tok].item() for j, tok in enumerate(target))
            greedy = all(int(log_probs[start - 1 + j].argmax()) == tok for j, tok in enumerate(target))
            assert single[k][c][0] == pytest.approx(expected, abs=1e-4)
            assert batched[k][c][0] == pytest.approx(expected, abs=1e-4)
            assert single[k][c][1] == batched[k][c][1] == greedy


def test_greedy_flag_is_true_for_the_models_own_continuation(tiny_model, processor, requests):
    prompts, images = requests
    inputs = processor(text=prompts[3], return_tensors="pt")
    with torch.no_grad():
        out = tiny_model.generate(**inputs, do_sample=False, max_new_tokens=1,
                                  pad_token_id=processor.tokenizer.pad_token_id)
    token = out[0, -1].item()
    own = processor.tokenizer.decode([token])
    assert processor.tokenizer.encode(own, add_special_tokens=False) == [token]  # the text maps back to the token
    scores = predictor(tiny_model, processor, 2).continuation_scores([prompts[3]], [[]], [[own]])
    assert scores[0][0][1] is True


def test_batch_size_must_be_positive(tiny_model, processor):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        Predictor(tiny_model, processor, batch_size=0)
