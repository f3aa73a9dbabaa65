"""Decoding settings of the Open-Qwen2VL evaluation harness (``vlm-evaluation/vlm_eval/models/prismatic.py``)."""

# Its `eos_token_id` list. With the Qwen tokenizer, 13 is ".", 11 is "," and 198 is "\n"; the other ids were written
# for LLaMA tokenizers and are ordinary Qwen tokens, kept so generation stops exactly where the original's did.
# `<|im_end|>` is not among them: the original stops on punctuation or after 16 tokens.
ORIGINAL_STOP_TOKEN_IDS = (13, 29889, 29892, 32000, 32001, 32002, 32007, 32011, 128009, 128256, 128257, 11, 198)
ORIGINAL_MAX_NEW_TOKENS = 16
