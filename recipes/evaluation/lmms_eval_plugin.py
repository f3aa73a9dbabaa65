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
raises, naming the task, split and doc id; so does one whose images cannot be read (``ValueError``, the decoder's
error chained) and a ``loglikelihood`` request with an empty continuation. Requests are read and run
``BATCHES_PER_CHUNK`` batches at a time (a task's images are never all in memory), answers come in request order.
Generation is greedy with one beam (a task's ``do_sample``, ``temperature`` > 0 or ``num_beams`` > 1 is ignored with
one warning per task); with ``prompt_format=raw`` it also stops at "." "," and newline as the original harness did.
On several processes (``accelerate launch`` / ``torchrun``) lmms-eval shards the docs; ``device`` is where it counts
them.
``loglikelihood`` answers, like lmms-eval's own models, with the mean negative log-likelihood per continuation token
(lmms-eval picks the multiple-choice answer by argmin) and whether greedy decoding would produce the continuation.
Images go where the task's context has ``<image>`` markers, otherwise all in front (``<image>\\n`` each).
"""

from __future__ import annotations

import atexit
import logging
from collections import defaultdict

import torch
from lmms_eval.api.model import lmms
from PIL import Image

from ..process_exit import destroy_process_group_if_any
from .generation import Predictor, batched
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


def _unreadable_visuals(doc: str, error: Exception) -> ValueError:
    """The error for a doc whose images cannot be read (lmms-eval models raise on a bad doc; this names it)."""
    return ValueError(f"open_qwen2vl cannot read the images of {doc}: {type(error).__name__}: {error}")


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _truncate(text: str, until: list[str]) -> str:
    cut = min((text.find(stop) for stop in until if stop and stop in text), default=-1)
    return text[:cut] if cut >= 0 else text


def _ignored_decoding_settings(gen_kwargs: dict) -> list[str]:
    """The task's decoding settings the plugin does not honour (it decodes greedily, with one beam)."""
    ignored = []
    if gen_kwargs.get("do_sample"):
        ignored.append("do_sample")
    if float(gen_kwargs.get("temperature") or 0) > 0:
        ignored.append("temperature")
    if int(gen_kwargs.get("num_beams") or 1) > 1:
        ignored.append("num_beams")
    return ignored


# Requests are read (images decoded) and run this many batches at a time, so a task's images never all sit in
# memory at once: lmms-eval hands a model every request of a run in one call.
BATCHES_PER_CHUNK = 8


def process_device(requested: str | None, accelerator) -> torch.device:
    """Where this process's model goes. ``device=cuda`` without an index means this process's GPU when several
    processes run (as lmms-eval's own models map it), not GPU 0 for every process; an explicit index is kept."""
    if requested is None:
        return accelerator.device
    device = torch.device(requested)
    if accelerator.num_processes > 1 and device.index is None and device.type == accelerator.device.type:
        return accelerator.device
    return device


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
        if accelerator.num_processes > 1:  # lmms-eval never frees the group (see process_exit)
            atexit.unregister(destroy_process_group_if_any)  # once, however many models a process builds
            atexit.register(destroy_process_group_if_any)
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        trust = trust_remote_code if isinstance(trust_remote_code, bool) else str(trust_remote_code).lower() == "true"
        self.model, self.processor = load_model_and_processor(  # prompt options are checked before the model loads
            pretrained, device=process_device(device, accelerator), dtype=dtype, trust_remote_code=trust,
            check_processor=lambda processor: PromptFormatter(prompt_format, processor, chat_template),
        )
        self.prompt_format = prompt_format
        self.formatter = PromptFormatter(prompt_format, self.processor, chat_template)
        self.predictor = Predictor(self.model, self.processor, batch, show_progress=self._rank == 0)
        self._device = self.predictor.device
        self.max_new_tokens = int(max_new_tokens)
        eos = self.processor.tokenizer.eos_token_id
        self.stop_token_ids = list(ORIGINAL_STOP_TOKEN_IDS) if prompt_format == "raw" else [eos]

    @property
    def batch_size(self) -> int:
        return self.predictor.batch_size

    @property
    def device(self) -> torch.device:
        """The model's device: lmms-eval's evaluator puts its cross-process request counts there when it runs on
        several processes (``accelerate launch`` / ``torchrun``)."""
        return self._device

    def clean(self) -> None:
        """lmms-eval calls this once every request is answered, to free the accelerator (e.g. for a local judge
        model); the base class drops the model attributes, and the predictor's reference must go too."""
        self.predictor.model = None
        super().clean()

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        doc = _doc_name(task, split, doc_id)
        try:  # the dataset decodes the doc's images here, the task's doc_to_visual may open files
            visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        except Exception as error:
            raise _unreadable_visuals(doc, error) from error
        for position, visual in enumerate(visuals):
            if not isinstance(visual, Image.Image):
                raise NotImplementedError(
                    f"open_qwen2vl takes images only; {doc} gave a "
                    f"{type(visual).__name__} as visual {position} ({_shorten(repr(visual))})"
                )
        try:  # PIL decodes the pixels only now: a broken image stream fails here
            return [v.convert("RGB") for v in visuals]
        except Exception as error:
            raise _unreadable_visuals(doc, error) from error

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

    def _chunk_size(self) -> int:
        return self.batch_size * BATCHES_PER_CHUNK

    def _generation_key(self, gen_kwargs: dict | None, task: str, warned: set) -> tuple[int, tuple[str, ...]]:
        """(max_new_tokens, until) of a request; settings the plugin cannot honour are logged once per task."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        ignored = _ignored_decoding_settings(gen_kwargs)
        if ignored and task not in warned:
            warned.add(task)
            logger.warning("open_qwen2vl decodes greedily with one beam; ignoring %s of task %s",
                           ", ".join(ignored), task)
        return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), tuple(until)

    def generate_until(self, requests) -> list[str]:
        groups = defaultdict(list)  # requests sharing generation settings run together
        warned: set[str] = set()
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            key = self._generation_key(gen_kwargs, task, warned)
            groups[key].append((index, context, doc_to_visual, doc_id, task, split))
        results: list[str | None] = [None] * len(requests)
        for (max_new_tokens, until), items in groups.items():
            for chunk in batched(items, self._chunk_size()):
                for (index, *_), text in zip(chunk, self._generate_chunk(chunk, max_new_tokens)):
                    results[index] = _truncate(text, list(until))
        return results

    def _generate_chunk(self, items: list, max_new_tokens: int) -> list[str]:
        images = [self._visuals(d2v, doc_id, task, split) for _, _, d2v, doc_id, task, split in items]
        prompts = [self._prompt(context, len(imgs), True, _doc_name(task, split, doc_id))
                   for (_, context, _, doc_id, task, split), imgs in zip(items, images)]
        return self.predictor.generate(prompts, images, max_new_tokens, self.stop_token_ids)

    def loglikelihood(self, requests) -> list:
        responses = []
        for chunk in batched(list(requests), self._chunk_size()):
            responses.extend(self._loglikelihood_chunk(chunk))
        return responses

    def _continuation(self, doc_to_target, doc_id, task: str, split: str) -> tuple[str, int]:
        """The request's continuation and its token count (a multiple-choice request carries it as a string, a
        ``loglikelihood`` task's as its ``doc_to_target``)."""
        if isinstance(doc_to_target, str):
            continuation = doc_to_target
        else:
            continuation = str(doc_to_target(self.task_dict[task][split][doc_id]))
        length = len(self.processor.tokenizer.encode(continuation, add_special_tokens=False))
        if not length:
            raise ValueError(f"open_qwen2vl: {_doc_name(task, split, doc_id)} has an empty continuation "
                             f"({continuation!r}): there is nothing to score")
        return continuation, length

    def _loglikelihood_chunk(self, requests: list) -> list:
        prompts, images, continuations, lengths = [], [], [], []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            continuation, length = self._continuation(doc_to_target, doc_id, task, split)
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prompts.append(self._prompt(context, len(visuals), False, _doc_name(task, split, doc_id)))
            images.append(visuals)
            continuations.append([continuation])
            lengths.append(length)
        scored = self.predictor.continuation_scores(prompts, images, continuations)
        # lmms-eval's built-in models answer with the mean loss (negative log-likelihood per continuation token)
        # and its multiple-choice scoring takes the argmin, so the same convention is used here.
        return [_loglikelihood_response(-log_likelihood / length, is_greedy)
                for ((log_likelihood, is_greedy),), length in zip(scored, lengths)]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("open_qwen2vl does not implement multi-round generation")
