"""An independent reference of the original Open-Qwen2VL (prismatic) model, for the converter's parity tests.

Written from the spec in the digest of the original code (§1.1-1.3, §2.2-2.4), not from the kit's classes:
- vision: a timm-layout SigLIP ViT (``featurizer.``: conv patch embed, ``pos_embed [1, N, D]``, blocks with fused
  ``attn.qkv`` and exact-erf GELU MLPs, final ``norm``, ``attn_pool`` latent-query head); the features are the output
  of block ``len(blocks) - 2`` with no final norm;
- projector: ``AdaptiveAvgPool2d`` of the row-major patch grid to ``sqrt(query_num)`` squared, then
  ``mlp_projector = Linear -> GELU -> Linear``;
- LLM: transformers' ``Qwen2ForCausalLM`` (as the original) under ``llm_backbone.llm``;
- forward: each ``-200`` sentinel in ``input_ids`` is replaced by all projected tokens of the next image (images
  consumed in order across the batch), padding stripped by ``input_ids != pad`` and re-added on the right as zero
  embeddings, positions ``0..L-1``.
Its ``state_dict`` has the original key layout, so ``checkpoint()`` is what the original ``torch.save``s.

Helpers used by the other ``test_convert_*`` files live here; the tests at the bottom check the reference itself
against the spec.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

SENTINEL = -200
IGNORE_INDEX = -100
BOS_ID = 128245
EOS_ID = 151645
PAD_ID = 151643
IMAGE_PAD_ID = 151655

# The tiny parity architecture: a 27x27 patch grid (like SigLIP-384/14) so both 144 and 729 tokens exist, and
# distinct widths everywhere so a transposed or swapped tensor cannot go unnoticed.
VISION = {"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 2,
          "image_size": 54, "patch_size": 2, "layer_norm_eps": 1e-6}
TEXT = {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": True,
        "bos_token_id": PAD_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


# ------------------------------------------------------------------------------------------ timm-layout vision


class TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, timm's default
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmAttention(nn.Module):
    """Fused qkv projection; output rows are [q | k | v], each split into heads."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = ((q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = TimmMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, pixels):
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D], row-major patches


class TimmAttentionPool(nn.Module):
    """timm's latent-query attention pooling ('map' global pool): one learned query over all tokens."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = TimmMlp(dim, hidden)

    def forward(self, x):
        b, n, c = x.shape
        hd = c // self.heads
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, 1, self.heads, hd).transpose(1, 2)
        kv = self.kv(x).reshape(b, n, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        weights = ((q @ kv[0].transpose(-2, -1)) / math.sqrt(hd)).softmax(dim=-1)
        out = self.proj((weights @ kv[1]).transpose(1, 2).reshape(b, 1, c))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


class TimmSiglipViT(nn.Module):
    def __init__(self, image_size, patch_size, hidden_size, intermediate_size, num_hidden_layers,
                 num_attention_heads, layer_norm_eps):
        super().__init__()
        grid = image_size // patch_size
        self.patch_embed = TimmPatchEmbed(patch_size, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size))
        self.blocks = nn.ModuleList(
            TimmBlock(hidden_size, num_attention_heads, intermediate_size, layer_norm_eps)
            for _ in range(num_hidden_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attn_pool = TimmAttentionPool(hidden_size, num_attention_heads, intermediate_size, layer_norm_eps)

    def block_outputs(self, pixels):
        x = self.patch_embed(pixels) + self.pos_embed
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def pooled(self, pixels):
        """timm's own head: attention pooling of the final-norm features (unused by Open-Qwen2VL)."""
        return self.attn_pool(self.norm(self.block_outputs(pixels)[-1]))


class VisionBackbone(nn.Module):
    def __init__(self, **vision):
        super().__init__()
        self.featurizer = TimmSiglipViT(**vision)

    def forward(self, pixels):
        # prismatic patches featurizer.forward to get_intermediate_layers(n={len(blocks) - 2}): no final norm.
        return self.featurizer.block_outputs(pixels)[len(self.featurizer.blocks) - 2]


class AvgPoolProjector(nn.Module):
    def __init__(self, query_num: int, vision_dim: int, llm_dim: int):
        super().__init__()
        self.side = math.isqrt(query_num)
        self.mlp_projector = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, features):
        b, n, c = features.shape
        grid = math.isqrt(n)
        image = features.view(b, grid, grid, c).permute(0, 3, 1, 2)  # row-major token grid
        pooled = nn.functional.adaptive_avg_pool2d(image, self.side)
        return self.mlp_projector(pooled.permute(0, 2, 3, 1).reshape(b, self.side * self.side, c))


class LLMBackbone(nn.Module):
    def __init__(self, text: dict):
        super().__init__()
        config = Qwen2Config(**text)
        config._attn_implementation = "eager"  # explicit softmax attention: independent of the kit's SDPA path
        self.llm = Qwen2ForCausalLM(config)


class PrismaticReference(nn.Module):
    """The original PrismaticVLM forward for Open-Qwen2VL, in the original module/key layout."""

    def __init__(self, query_num: int = 144, vision: dict = VISION, text: dict = TEXT, model_max_length: int = 4096):
        super().__init__()
        self.vision_backbone = VisionBackbone(**vision)
        self.projector = AvgPoolProjector(query_num, vision["hidden_size"], text["hidden_size"])
        self.llm_backbone = LLMBackbone(text)
        self.pad_token_id = PAD_ID
        self.model_max_length = model_max_length

    def set_query_num(self, query_num: int) -> None:
        self.projector.side = math.isqrt(query_num)  # pooling has no weights: 144 <-> 729 is this number only

    def checkpoint(self, with_vision: bool = True, with_lm_head: bool = True) -> dict:
        model = {
            "projector": dict(self.projector.state_dict()),
            "llm_backbone": dict(self.llm_backbone.state_dict()),
        }
        if not with_lm_head:
            model["llm_backbone"].pop("llm.lm_head.weight")
        if with_vision:
            model = {"vision_backbone": dict(self.vision_backbone.state_dict()), **model}
        return {"model": model}

    def forward(self, input_ids, pixel_values, logits_to_keep=0):
        """input_ids [B, L] with -200 per image and `pad` right padding; pixel_values: per sample a list of [3,H,W]."""
        flat = [image for sample in pixel_values for image in sample]
        projected = self.projector(self.vision_backbone(torch.stack(flat)))
        embed = self.llm_backbone.llm.get_input_embeddings()
        keep = input_ids.ne(self.pad_token_id)
        sequences, image_index = [], 0
        for ids, mask in zip(input_ids, keep):
            ids = ids[mask]
            positions = torch.where(ids == SENTINEL)[0].tolist()
            if not positions:
                sequences.append(embed(ids))
                image_index += 1  # the original consumes one (dummy) image slot per text-only sample
                continue
            parts, start = [], 0
            for position in positions:
                parts.append(embed(ids[start:position]))
                parts.append(projected[image_index])
                image_index += 1
                start = position + 1
            parts.append(embed(ids[start:]))
            sequences.append(torch.cat(parts)[: self.model_max_length])
        length = max(len(s) for s in sequences)
        embeds = torch.zeros(len(sequences), length, sequences[0].shape[-1], dtype=sequences[0].dtype)
        attention = torch.zeros(len(sequences), length, dtype=torch.bool)
        for row, sequence in enumerate(sequences):
            embeds[row, : len(sequence)] = sequence
            attention[row, : len(sequence)] = True
        return self.llm_backbone.llm(inputs_embeds=embeds, attention_mask=attention, logits_to_keep=logits_to_keep)

    @torch.no_grad()
    def greedy(self, input_ids, pixel_values, max_new_tokens: int) -> list[int]:
        """Greedy decoding by full recomputation (the cache-free meaning of generate_batch, batch size 1)."""
        ids = input_ids
        new = []
        for _ in range(max_new_tokens):
            token = int(self(ids, pixel_values, logits_to_keep=1).logits[0, -1].argmax())
            new.append(token)
            if token == EOS_ID:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return new


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random values for every parameter, norms and biases included (default inits leave them 1/0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(("pos_embed", "latent", "embed_tokens.weight")):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            else:
                bound = 1.0 / math.sqrt(param[0].numel())
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
    return module


def build_reference(query_num: int = 144, seed: int = 0) -> PrismaticReference:
    return randomize_(PrismaticReference(query_num), seed).eval()


# ------------------------------------------------------------------------------------------ text formats


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA/prismatic ``tokenizer_image_token``: chunks around ``<image>`` tokenized separately, joined by -200;
    when the first chunk starts with BOS, that BOS is emitted once and the first token of every chunk is skipped."""
    chunks = [tokenizer(chunk, add_special_tokens=False).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(SENTINEL)
        ids.extend(chunk[offset:])
    return ids


SYSTEM_PROMPT = "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def prompt_builder_turns(messages: list[str]) -> list[str]:
    """Qwen2PromptBuilder.add_turn outputs: stripped messages, even turns user, odd turns assistant."""
    turns = []
    for index, message in enumerate(messages):
        message = message.strip()
        if index % 2 == 0:
            wrapped = "<|im_start|>user\n" + message + "<|im_end|>assistant\n"
            turns.append(SYSTEM_PROMPT + wrapped if index == 0 else wrapped)
        else:
            turns.append((message if message else " ") + "<|im_end|>\n")
    return turns


def sft_ids(messages: list[str], tokenizer) -> list[int]:
    """The original SFT dataset's ids: each turn through tokenizer_image_token, concatenated."""
    ids = []
    for turn in prompt_builder_turns(messages):
        ids.extend(tokenizer_image_token(turn, tokenizer))
    return ids


def pretraining_doc_ids(caption: str, tokenizer) -> list[int]:
    """``<s>`` + tokenizer_image_token("<image>\\n" + caption) + ``<|im_end|>``, as the packer builds one document."""
    return [tokenizer.bos_token_id] + tokenizer_image_token("<image>\n" + caption, tokenizer) + [tokenizer.eos_token_id]


def generate_batch_ids(prompt: str, tokenizer) -> list[int]:
    """generate_batch: tokenizer_image_token(prompt) with the BOS id always prepended."""
    return [tokenizer.bos_token_id] + tokenizer_image_token(prompt, tokenizer)


def expand(ids: list[int], num_image_tokens: int) -> list[int]:
    """The sentinel ids as the kit sees them: each -200 becomes num_image_tokens image placeholders."""
    out = []
    for token in ids:
        out.extend([IMAGE_PAD_ID] * num_image_tokens if token == SENTINEL else [token])
    return out


def right_pad(rows: list[list[int]], pad: int = PAD_ID) -> torch.Tensor:
    length = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (length - len(r)) for r in rows])


def tiny_base_config(num_image_tokens: int = 144):
    from modeling_open_qwen2vl import OpenQwen2VLConfig

    vision = {"model_type": "siglip_vision_model", "hidden_act": "gelu", "vision_use_head": False, **VISION}
    return OpenQwen2VLConfig(vision_config=vision, text_config={"model_type": "qwen2", **TEXT},
                             num_image_tokens=num_image_tokens)


def run_config(arch_specifier: str, model_id: str = "tiny-open-qwen2vl") -> dict:
    """A prismatic run config.json as the original writes it (the fields the converter reads)."""
    return {
        "model": {
            "type": "one-stage+7b",
            "model_id": model_id,
            "arch_specifier": arch_specifier,
            "vision_backbone_id": "siglip-vit-so400m-384px",
            "llm_backbone_id": "qwen2.5-1.5b-instruct",
            "image_resize_strategy": "resize-naive",
            "llm_max_length": 4096,
        },
        "mount_path": "Qwen",
        "stage": "finetune",
    }


# ------------------------------------------------------------------------------------------ the reference's own tests


def test_reference_pooling_follows_the_window_formula():
    """27 -> 12 adaptive pooling: window i covers [floor(27 i / 12), ceil(27 (i + 1) / 12)), all 3 wide."""
    projector = AvgPoolProjector(144, 4, 8)
    features = torch.randn(1, 729, 4, dtype=torch.float64)
    pooled = nn.functional.adaptive_avg_pool2d(features.view(1, 27, 27, 4).permute(0, 3, 1, 2), 12)
    grid = features.view(27, 27, 4)
    widths = set()
    for i in range(12):
        r0, r1 = (27 * i) // 12, -((-27 * (i + 1)) // 12)
        widths.add(r1 - r0)
        for j in range(12):
            c0, c1 = (27 * j) // 12, -((-27 * (j + 1)) // 12)
            torch.testing.assert_close(pooled[0, :, i, j], grid[r0:r1, c0:c1].mean(dim=(0, 1)))
    assert widths == {3}
    assert projector.side == 12


def test_reference_features_are_block_minus_two_without_norm():
    model = build_reference()
    pixels = torch.randn(2, 3, 54, 54)
    with torch.no_grad():
        outputs = model.vision_backbone.featurizer.block_outputs(pixels)
        features = model.vision_backbone(pixels)
    assert len(outputs) == VISION["num_hidden_layers"] and features.shape == (2, 729, VISION["hidden_size"])
    torch.testing.assert_close(features, outputs[-2], rtol=0, atol=0)
    assert not torch.allclose(features, outputs[-1])


def test_reference_checkpoint_has_the_original_key_layout():
    groups = build_reference().checkpoint()["model"]
    assert set(groups) == {"vision_backbone", "projector", "llm_backbone"}
    assert set(groups["projector"]) == {f"mlp_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    vision = groups["vision_backbone"]
    assert vision["featurizer.pos_embed"].shape == (1, 729, 24)
    assert vision["featurizer.blocks.0.attn.qkv.weight"].shape == (72, 24)
    assert vision["featurizer.patch_embed.proj.weight"].shape == (24, 3, 2, 2)
    assert {k.split(".")[2] for k in vision if k.startswith("featurizer.attn_pool.")} == \
        {"latent", "q", "kv", "proj", "norm", "mlp"}
    assert "llm.lm_head.weight" in groups["llm_backbone"] and "llm.model.embed_tokens.weight" in groups["llm_backbone"]


def test_sentinel_splice_places_every_image_at_its_marker():
    model = build_reference()
    tok_ids = torch.tensor([[5, SENTINEL, 7, SENTINEL, 9, PAD_ID]])
    pixels = [[torch.randn(3, 54, 54), torch.randn(3, 54, 54)]]
    with torch.no_grad():
        projected = model.projector(model.vision_backbone(torch.stack(pixels[0])))
        captured = {}
        hook = model.llm_backbone.llm.model.register_forward_pre_hook(
            lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
        model(tok_ids, pixels)
        hook.remove()
    embeds, mask = captured["inputs_embeds"][0], captured["attention_mask"][0]
    table = model.llm_backbone.llm.get_input_embeddings().weight
    assert embeds.shape[0] == 3 + 2 * 144 and bool(mask.all())
    torch.testing.assert_close(embeds[0], table[5])
    torch.testing.assert_close(embeds[1:145], projected[0])
    torch.testing.assert_close(embeds[145], table[7])
    torch.testing.assert_close(embeds[146:290], projected[1])
    torch.testing.assert_close(embeds[290], table[9])
