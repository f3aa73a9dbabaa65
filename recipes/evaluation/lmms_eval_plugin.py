"""lmms-eval model plugin: ``lmms-eval --model open_qwen2vl --model_args pretrained=<folder or hub id> --tasks ...``.

Registered through the ``lmms_eval.models`` entry-point group (see ``lmms_eval_manifest``); lmms-eval is an optional
extra of the kit (``pip install --no-deps lmms-eval==0.7.3`` plus pytz, sacrebleu, tenacity, and pytablewriter with
its pure-Python dependencies for the CLI's result table: lmms-eval's full dependency set pulls a torchvision that does
not work beside the CPU torch 2.13).

Model arguments: ``pretrained`` (required), ``device``, ``dtype`` (auto, float32, bfloat16), ``batch_size`` (from the
CLI's ``--batch_size``; do not repeat it in ``--model_args``): an integer >= 1, or ``auto`` / ``auto:N``, which do not
probe memory but take ``max_batch_size`` (the CLI's ``--max_batch_size``) or else 8; ``max_batch_size`` is ignored
with an integer ``batch_size``, as in lmms-eval's own models,
``prompt_format`` ("chat": the processor's chat template, default; "raw": the original harness's ``<s>`` + prompt +
``\\nAnswer:``), ``chat_template`` (template name, checked before the model loads), ``max_new_tokens`` (default
when a task sets none). A doc the model cannot take (a non-image visual, ``<image>`` markers not matching its images)
raises, naming the task, split and doc id.
Generation is greedy; with ``prompt_format=raw`` it also stops at "." "," and newline as the original harness did.
``loglikelihood`` answers, like lmms-eval's own models, with the mean negative log-likelihood per continuation token
(lmms-eval picks the multiple-choice answer by argmin) and whether greedy decoding would produce the continuation.
Images go where the task's context has ``<image>`` markers, otherwise all in front (``<image>\\n`` each).
"""

from __future__ import annotations

import logging
from collections import defaultdict

from lmms_eval.api.model import lmms
from PIL import Image

from .generation import Predictor
from .lmms_eval_compat import ensure_filelock_api
from .model_loading import load_model_and_processor
from .original_settings import ORIGINAL_STOP_TOKEN_IDS
from .prompts import ANSWER_CUE, IMAGE, PromptFormatter

logger = logging.getLogger(__name__)
ensure_filelock_api()  # lmms-eval imports the model class before it patches filelock; see lmms_eval_compat


def _flatten(visuals) -> list:
    flat = []
    for item in visuals or []:
        flat.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return flat


def _loglikelihood_response(loss: float, is_greedy: bool):
    """A (loss, is_greedy) answer that survives lmms-eval's response handling.

    lmms-eval 0.7.3 passes every response through ``unwrap_generation_output``, which turns a plain
    ``(float, bool)`` tuple into its string, so multiple-choice tasks then fail in ``process_results``. A
    ``GenerationResult`` is unwrapped to its ``text`` field as is, so the tuple travels inside one.
    """
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:  # lmms-eval versions without it take the tuple as is
        return (loss, is_greedy)
    return GenerationResult(text=(loss, is_greedy))


AUTO_BATCH_SIZE = 8  # ``batch_size=auto`` without ``max_batch_size``: recipes/eval.py's default --batch-size


def resolve_batch_size(batch_size: int | str, max_batch_size: int | str | None = None) -> int:
    """The batch size the plugin runs with, from lmms-eval's ``batch_size`` (N, "auto" or "auto:N") and
    ``max_batch_size`` ("the maximal batch size to try with auto"). Checked before the model loads, so a bad value
    fails at once instead of after loading."""
    def positive(name: str, value: int | str) -> int:
        text = str(value).strip()
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            allowed = "an integer >= 1 or auto" if name == "batch_size" else "an integer >= 1"
            raise ValueError(f"open_qwen2vl: {name} must be {allowed}, got {value!r}")
        return int(text)

    cap = positive("max_batch_size", max_batch_size) if max_batch_size is not None else None
    text = str(batch_size).strip().lower()
    if text == "auto" or text.startswith("auto:"):
        # No memory probing (lmms-eval leaves "auto" to each model): the given cap, else AUTO_BATCH_SIZE.
        return cap or AUTO_BATCH_SIZE
    return positive("batch_size", batch_size)


def _doc_name(task: str, split: str, doc_id) -> str:
    """How errors name a request's doc (lmms-eval models raise on a bad doc; the name says which one)."""
    return f"task {task} split {split} doc {doc_id}"


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _truncate(text: str, until: list[str]) -> str:
    cut = min((text.find(stop) for stop in until if stop and stop in text), default=-1)
    return text[:cut] if cut >= 0 else text


class OpenQwen2VLLmms(lmms):
    """Open-Qwen2VL for lmms-eval (a "simple" model: tasks give text contexts plus ``doc_to_visual``)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | str | None = None,
        prompt_format: str = "chat",
        chat_template: str | None = None,
        max_new_tokens: int | str = 128,
        trust_remote_code: bool | str = True,
        **unexpected,
    ) -> None:
        super().__init__()
        if unexpected:
            raise TypeError(f"open_qwen2vl got unknown model arguments {sorted(unexpected)}")
        batch = resolve_batch_size(batch_size, max_batch_size)
        from accelerate import Accelerator

        accelerator = Accelerator()
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        trust = trust_remote_code if isinstance(trust_remote_code, bool) else str(trust_remote_code).lower() == "true"
        self.model, self.processor = load_model_and_processor(  # prompt options are checked before the model loads
            pretrained, device=device or accelerator.device, dtype=dtype, trust_remote_code=trust,
            check_processor=lambda processor: PromptFormatter(prompt_format, processor, chat_template),
        )
        self.prompt_format = prompt_format
        self.formatter = PromptFormatter(prompt_format, self.processor, chat_template)
        self.predictor = Predictor(self.model, self.processor, batch, show_progress=self._rank == 0)
        self.max_new_tokens = int(max_new_tokens)
        eos = self.processor.tokenizer.eos_token_id
        self.stop_token_ids = list(ORIGINAL_STOP_TOKEN_IDS) if prompt_format == "raw" else [eos]

    @property
    def batch_size(self) -> int:
        return self.predictor.batch_size

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        for position, visual in enumerate(visuals):
            if not isinstance(visual, Image.Image):
                raise NotImplementedError(
                    f"open_qwen2vl takes images only; {_doc_name(task, split, doc_id)} gave a "
                    f"{type(visual).__name__} as visual {position} ({_shorten(repr(visual))})"
                )
        return [v.convert("RGB") for v in visuals]

    def _text(self, context: str, num_images: int, doc: str) -> str:
        """The context with one ``<image>`` marker per image (added in front when the task wrote none); ``doc``
        names the request's doc for errors."""
        if IMAGE in context:
            if context.count(IMAGE) != num_images:
                raise ValueError(f"{doc}: context has {context.count(IMAGE)} {IMAGE} markers for {num_images} images")
            return context
        return f"{IMAGE}\n" * num_images + context

    def _prompt(self, context: str, num_images: int, for_generation: bool, doc: str) -> str:
        text = self._text(context, num_images, doc)
        if self.prompt_format == "raw":
            return self.formatter(text + (ANSWER_CUE if for_generation else ""))
        return self.formatter(text, chat_text=text)

    def generate_until(self, requests) -> list[str]:
        groups = defaultdict(list)  # requests sharing generation settings run together
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
                logger.warning("open_qwen2vl decodes greedily; ignoring sampling settings of task %s", task)
            key = (int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), tuple(until))
            groups[key].append((index, context, doc_to_visual, doc_id, task, split))
        results: list[str | None] = [None] * len(requests)
        for (max_new_tokens, until), items in groups.items():
            images = [self._visuals(d2v, doc_id, task, split) for _, _, d2v, doc_id, task, split in items]
            prompts = [self._prompt(context, len(imgs), True, _doc_name(task, split, doc_id))
                       for (_, context, _, doc_id, task, split), imgs in zip(items, images)]
            texts = self.predictor.generate(prompts, images, max_new_tokens, self.stop_token_ids)
            for (index, *_), text in zip(items, texts):
                results[index] = _truncate(text, list(until))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        prompts, images, continuations = [], [], []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prompts.append(self._prompt(context, len(visuals), False, _doc_name(task, split, doc_id)))
            images.append(visuals)
            continuations.append([str(continuation)])
        scored = self.predictor.continuation_scores(prompts, images, continuations)
        responses = []
        for (log_likelihood, is_greedy), (continuation,) in zip((row[0] for row in scored), continuations):
            # lmms-eval's built-in models answer with the mean loss (negative log-likelihood per continuation token)
            # and its multiple-choice scoring takes the argmin, so the same convention is used here.
            length = len(self.processor.tokenizer.encode(continuation, add_special_tokens=False))
            responses.append(_loglikelihood_response(-log_likelihood / length, is_greedy))
        return responses

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("open_qwen2vl does not implement multi-round generation")
