"""Model overhead vs transformers' LLaVA: forward+backward time and generation tokens/s, side by side.

Both models use the same SigLIP vision config and Qwen2 text config; LLaVA's projector is the same
Linear-GELU-Linear, and the Open-Qwen2VL pooling is set to the full patch grid so both feed the same number of image
tokens to the LLM. Measurements alternate between the two models so machine noise hits both alike.
Targets: time <= 1.05x LLaVA, tokens/s >= 0.95x LLaVA.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

from bench._common import markdown_table, write_result  # noqa: E402
from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration  # noqa: E402

IMAGE_TOKEN = 5
GRID = 8  # 64 / 8


def build_models():
    cfg = OpenQwen2VLConfig.tiny(
        num_image_tokens=GRID * GRID, vocab_size=8192, image_token_id=IMAGE_TOKEN, hidden_size=256,
        vision_hidden_size=192, num_hidden_layers=4, vision_layers=4,
    )
    cfg.text_config.num_attention_heads = 8
    cfg.vision_config.num_attention_heads = 4
    torch.manual_seed(0)
    ours = OpenQwen2VLForConditionalGeneration(cfg).eval()
    llava_cfg = LlavaConfig(
        vision_config=cfg.vision_config.to_dict(), text_config=cfg.text_config.to_dict(),
        image_token_index=IMAGE_TOKEN, image_seq_length=GRID * GRID, vision_feature_layer=-2,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(llava_cfg).eval()
    # The same decoding on both sides: the kit's generation config never generates the image placeholder
    # (suppress_tokens, a logits processor per step); LLaVA gets the same setting, so only the models differ.
    llava.generation_config.suppress_tokens = list(ours.generation_config.suppress_tokens)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_llava = sum(p.numel() for p in llava.parameters())
    assert abs(n_ours - n_llava) / n_llava < 0.01, (n_ours, n_llava)
    return ours, llava


def make_batch(batch_size: int, seq_len: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 8000, (batch_size, seq_len), generator=g)
    ids[:, 1 : 1 + GRID * GRID] = IMAGE_TOKEN
    pixels = torch.randn(batch_size, 3, 64, 64, generator=g)
    return ids, pixels


def time_train_step(model, ids, pixels) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model(input_ids=ids, pixel_values=pixels, labels=ids.masked_fill(ids == IMAGE_TOKEN, -100))
    out.loss.backward()
    return time.perf_counter() - start


def time_generate(model, ids, pixels, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return new_tokens / (time.perf_counter() - start)


def main(repeats: int = 15) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ours, llava = build_models()
    ids, pixels = make_batch(4, 256)
    gen_ids, gen_pixels = make_batch(1, 96)
    models = {"Open-Qwen2VL (kit)": ours, "LLaVA (transformers)": llava}
    train = {k: [] for k in models}
    gen = {k: [] for k in models}
    for name, model in models.items():  # warm-up
        time_train_step(model, ids, pixels)
        time_generate(model, gen_ids, gen_pixels, 4)
    for _ in range(repeats):
        for name, model in models.items():
            train[name].append(time_train_step(model, ids, pixels))
            gen[name].append(time_generate(model, gen_ids, gen_pixels, 32))
    # Ratios per repeat (each repeat times both models back to back), then their median: a 70 ms generation is
    # easily disturbed, and pairing cancels slow phases of the machine that hit both models.
    base = "LLaVA (transformers)"
    rows = []
    for name in models:
        time_ratio = statistics.median(a / b for a, b in zip(train[name], train[base]))
        speed_ratio = statistics.median(a / b for a, b in zip(gen[name], gen[base]))
        rows.append([name, round(statistics.median(train[name]) * 1000, 1), round(time_ratio, 3),
                     round(statistics.median(gen[name]), 1), round(speed_ratio, 3)])
    table = markdown_table(
        ["model", "fwd+bwd ms (batch 4 x 256, 1 image each)", "time vs LLaVA", "generate tokens/s (batch 1)",
         "tokens/s vs LLaVA"], rows)
    print(table)
    body = (
        "Same SigLIP (4 layers, width 192, 64x64 images, 8x8 patches) and Qwen2 (4 layers, width 256, vocab 8192) "
        "sub-configs; 64 image tokens per image for both (the kit pools the full grid; it runs the vision layers up "
        "to its feature layer, -2, where LLaVA's tower runs all 4). Greedy generation with the image placeholder "
        "suppressed on both sides (the kit's default generation config). Times and tokens/s: medians of "
        f"{repeats} alternating repeats; ratios: medians of the per-repeat ratios. Targets: time <= 1.05x, tokens/s "
        ">= 0.95x.\n\n" + table
    )
    write_result("model_overhead", "Model overhead vs transformers LLaVA", body)


if __name__ == "__main__":
    main()
