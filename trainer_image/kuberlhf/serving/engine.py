"""The model in process: loads an HF causal LM + tokenizer and generates answers, whole or streamed.

Generation runs ``model.generate`` in a thread with a ``TextIteratorStreamer``; the answer text passes through
:class:`~kuberlhf.serving.prompting.StopScanner`, and a stopping criterion ends ``generate`` as soon as the
scanner saw a stop sequence or the caller cancelled (client gone), so no compute is spent past the answer."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from kuberlhf.serving.params import GenerationParams, PromptTooLongError, Usage
from kuberlhf.serving.prompting import StopScanner, Turn, build_prompt, stop_strings

log = logging.getLogger(__name__)

# A tokenizer's model_max_length is often a huge "unset" sentinel; only smaller values are real limits.
_SANE_MAX_LENGTH = 1_000_000


class _Control(StoppingCriteria):
    """Counts generated tokens and ends generation when the answer is complete or the caller cancelled."""

    def __init__(self, prompt_len: int, usage: Usage, stop_event: threading.Event) -> None:
        self.prompt_len = prompt_len
        self.usage = usage
        self.stop_event = stop_event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        self.usage.completion_tokens = int(input_ids.shape[-1]) - self.prompt_len
        return torch.full((input_ids.shape[0],), self.stop_event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class AnswerStream:
    """One generation: iterate for the answer's text pieces; ``usage`` is complete once iteration ends.
    ``cancel()`` stops the model early (e.g. the HTTP client went away)."""

    engine: ChatEngine
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    params: GenerationParams
    stops: list[str]
    usage: Usage
    _stop_event: threading.Event = field(default_factory=threading.Event)
    _error: list[BaseException] = field(default_factory=list)

    def cancel(self) -> None:
        self._stop_event.set()

    def __iter__(self) -> Iterator[str]:
        engine = self.engine
        streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        scanner = StopScanner(self.stops)
        thread = threading.Thread(target=self._generate, args=(streamer,), name="kuberlhf-generate", daemon=True)
        thread.start()
        try:
            for text in streamer:
                piece = scanner.feed(text)
                if scanner.stopped:
                    self._stop_event.set()
                if piece:
                    yield piece
            rest = scanner.finish()
            if rest:
                yield rest
        finally:
            # also reached when the consumer closes the generator: stop the model, let the thread end
            self._stop_event.set()
            thread.join(timeout=60)
        if self._error:
            raise RuntimeError(f"generation failed: {self._error[0]}") from self._error[0]
        hit_limit = self.usage.completion_tokens >= self.params.max_new_tokens
        self.usage.finish_reason = "length" if hit_limit and not scanner.stopped else "stop"

    def text(self) -> str:
        """The whole answer (non-streaming)."""
        return "".join(self)

    def _generate(self, streamer: TextIteratorStreamer) -> None:
        p = self.params
        kwargs: dict = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "max_new_tokens": p.max_new_tokens,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList(
                [_Control(self.input_ids.shape[-1], self.usage, self._stop_event)]
            ),
            "pad_token_id": self.engine.pad_token_id,
        }
        if p.temperature > 0:
            kwargs.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        try:
            if p.seed is not None:
                # the global RNG: a seeded answer is reproducible when no other generation runs alongside it
                torch.manual_seed(p.seed)
            with torch.inference_mode():
                self.engine.model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            log.exception("generation failed")
            self._error.append(exc)
            streamer.end()


class ChatEngine:
    """A loaded model + tokenizer that turns (role, text) conversations into answers."""

    def __init__(self, model_dir: Path | str, device: str | None = None) -> None:
        model_dir = Path(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # bf16 on GPUs that have it (what the stages train in); fp32 on CPU, where half precision is slow
        dtype = torch.float32
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        self.human_format = not getattr(self.tokenizer, "chat_template", None)
        self.max_context = self._max_context()
        log.info(
            "loaded %s on %s (%s, context %d, prompt format: %s)",
            model_dir,
            self.device,
            dtype,
            self.max_context,
            "Human/Assistant" if self.human_format else "chat template",
        )

    def _max_context(self) -> int:
        config = self.model.config
        limits = [getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max and tok_max < _SANE_MAX_LENGTH:
            limits.append(tok_max)
        return min((int(x) for x in limits if x), default=2048)

    def prompt(self, turns: Sequence[Turn]) -> str:
        template = None
        if not self.human_format:

            def template(messages: list[dict[str, str]]) -> str:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        return build_prompt(turns, template)

    def start(self, turns: Sequence[Turn], params: GenerationParams) -> AnswerStream:
        """Tokenize and check the conversation now (so errors surface before any response is sent); the model
        runs when the returned stream is iterated. ``max_new_tokens`` is clipped to the room left in context."""
        text = self.prompt(turns)
        # a chat template writes its own special tokens; the Human/Assistant format is tokenized as in training
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=self.human_format)
        prompt_len = int(enc["input_ids"].shape[-1])
        room = self.max_context - prompt_len
        if room < 1:
            raise PromptTooLongError(
                f"the conversation is {prompt_len} tokens, but the model's context is {self.max_context} tokens: "
                "shorten the messages or start a new conversation"
            )
        params = GenerationParams(
            max_new_tokens=max(1, min(params.max_new_tokens, room)),
            temperature=params.temperature,
            top_p=params.top_p,
            stop=params.stop,
            seed=params.seed,
        )
        return AnswerStream(
            engine=self,
            input_ids=enc["input_ids"].to(self.device),
            attention_mask=enc["attention_mask"].to(self.device),
            params=params,
            stops=stop_strings(params.stop, self.human_format),
            usage=Usage(prompt_tokens=prompt_len),
        )
