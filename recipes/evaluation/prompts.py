"""Prompt pieces shared by the benchmarks, and the two prompt formats of a run.

``raw`` is what the Open-Qwen2VL evaluation harness fed the model: ``<s>`` + the benchmark's instruction, which ends
in ``\\nAnswer:`` (no chat template, even for the instruction-tuned model). ``chat`` puts the same instruction,
without the trailing ``\\nAnswer:`` cue, in a user turn of the processor's chat template.
"""

from __future__ import annotations

IMAGE = "<image>"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
ANSWER_CUE = "\nAnswer:"
PROMPT_FORMATS = ("raw", "chat")


def letters(count: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(count)]


def option_lines(options: dict) -> str:
    """``A. text`` lines, one per option, joined by newlines."""
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def chat_text_from_raw(text: str) -> str:
    """The user message for the chat format: the raw instruction without its trailing ``\\nAnswer:`` cue."""
    return text[: -len(ANSWER_CUE)] if text.endswith(ANSWER_CUE) else text


class PromptOptionError(ValueError):
    """A prompt format / chat template choice that cannot work with the processor (raised before any prompt is made)."""


def check_chat_template(processor, name: str | None) -> None:
    """Raise PromptOptionError unless the processor has the template ``name`` (None: its default).

    transformers renders a ``chat_template`` that is not one of the processor's names as template text, so a
    misspelt name would otherwise turn every prompt into that word.
    """
    templates = getattr(processor, "chat_template", None)
    named = sorted(templates) if isinstance(templates, dict) else []
    if name is None:
        if templates is None or (isinstance(templates, dict) and "default" not in templates):
            hint = f"name one of {', '.join(named)}" if named else "use the raw prompt format"
            raise PromptOptionError(f"the processor has no default chat template; {hint}")
        return
    if name not in named:
        known = ", ".join(named) if named else "none (it has a single unnamed template: leave the name out)"
        raise PromptOptionError(f"unknown chat template {name!r}; the processor's templates: {known}")


class PromptFormatter:
    """Turns a sample's instruction into the model's prompt string (``<image>`` markers left for the processor).

    Args:
        prompt_format: "raw" (``<s>`` + instruction, the original harness) or "chat" (the processor's template).
        processor: needed for "chat".
        chat_template: a template name of the processor ("chatml", "compat") or None for its default; checked here
            (``PromptOptionError`` for a name the processor lacks, or a name given with "raw").
    """

    def __init__(self, prompt_format: str, processor=None, chat_template: str | None = None):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {prompt_format!r}; expected one of {PROMPT_FORMATS}")
        if prompt_format == "chat" and processor is None:
            raise ValueError("the chat prompt format needs the processor (for its chat template)")
        if prompt_format == "raw" and chat_template is not None:
            raise PromptOptionError(f"chat template {chat_template!r} given with the raw prompt format, which uses "
                                    "none; use the chat prompt format or leave the template out")
        if prompt_format == "chat":
            check_chat_template(processor, chat_template)
        self.prompt_format = prompt_format
        self.processor = processor
        self.chat_template = chat_template

    def __call__(self, text: str, chat_text: str | None = None) -> str:
        if self.prompt_format == "raw":
            from modeling_open_qwen2vl import format_raw_prompt

            return format_raw_prompt(text)
        message = {"role": "user", "content": chat_text if chat_text is not None else chat_text_from_raw(text)}
        kwargs = {"chat_template": self.chat_template} if self.chat_template else {}
        return self.processor.apply_chat_template([message], add_generation_prompt=True, tokenize=False, **kwargs)
