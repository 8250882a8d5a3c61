"""The model in process: loads an HF causal LM + tokenizer and generates answers, whole or streamed.

Generation runs ``model.generate`` in a thread with a ``TextIteratorStreamer``; the answer text passes through
:class:`~kuberlhf.serving.prompting.StopScanner`, and a stopping criterion ends ``generate`` as soon as the
scanner saw a stop sequence or the caller cancelled (client gone), so no compute is spent past the answer.

The sampling step is ours (:class:`_Sampler`, the last logits processor of a greedy ``generate``): OpenAI's
penalties and ``logit_bias``, temperature, top-p, and a draw from a ``torch.Generator`` of the request's own,
so seeded answers are reproducible however many generations run beside them and nothing touches the global
RNG. It also records the model's log-probabilities for ``logprobs``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from kuberlhf.serving.params import GenerationParams, InvalidParamError, PromptTooLongError, TokenLogprob, Usage
from kuberlhf.serving.prompting import StopScanner, Turn, build_prompt, fit_turns, stop_strings

log = logging.getLogger(__name__)

# A tokenizer's model_max_length is often a huge "unset" sentinel; only smaller values are real limits.
_SANE_MAX_LENGTH = 1_000_000


@cache
def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level BPE alphabet (printable bytes map to themselves, the others to 256+n),
    so a token's exact bytes can be reported even when they are part of a multi-byte character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class _Control(StoppingCriteria):
    """Counts generated tokens and ends generation when the answer is complete or the caller cancelled."""

    def __init__(self, prompt_len: int, usage: Usage, stop_event: threading.Event) -> None:
        self.prompt_len = prompt_len
        self.usage = usage
        self.stop_event = stop_event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        self.usage.completion_tokens = int(input_ids.shape[-1]) - self.prompt_len
        return torch.full((input_ids.shape[0],), self.stop_event.is_set(), dtype=torch.bool, device=input_ids.device)


class _Sampler(LogitsProcessor):
    """One sampling step (batch of one): returns scores where only the chosen token is finite, so the greedy
    search around it picks that token."""

    def __init__(self, params: GenerationParams, prompt_len: int, generator: torch.Generator, record: list) -> None:
        self.p = params
        self.prompt_len = prompt_len
        self.generator = generator
        self.record = record  # (token id, its logprob, top ids, top logprobs) per step, when logprobs are asked
        self.bias_ids = torch.tensor([i for i, _ in params.logit_bias], dtype=torch.long)
        self.bias_values = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        p = self.p
        logits = scores.float()
        logprobs = torch.log_softmax(logits, dim=-1) if p.logprobs else None
        if p.presence_penalty or p.frequency_penalty:
            answer = input_ids[:, self.prompt_len :]
            counts = torch.zeros_like(logits).scatter_add_(1, answer, torch.ones_like(answer, dtype=logits.dtype))
            logits = logits - counts * p.frequency_penalty - (counts > 0).to(logits.dtype) * p.presence_penalty
        if len(self.bias_ids):
            logits = logits.clone()
            logits[:, self.bias_ids.to(logits.device)] += self.bias_values.to(logits.device)
        if p.temperature == 0:
            choice = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / p.temperature, dim=-1)
            if p.top_p < 1:
                sorted_probs, order = probs.sort(dim=-1, descending=True)
                # drop the tokens after the smallest set whose mass reaches top_p (the first always stays)
                drop = sorted_probs.cumsum(dim=-1) - sorted_probs > p.top_p
                sorted_probs = sorted_probs.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
            choice = torch.multinomial(probs, 1, generator=self.generator)
        if logprobs is not None:
            token = int(choice[0, 0])
            top = logprobs[0].topk(p.top_logprobs) if p.top_logprobs else None
            self.record.append(
                (
                    token,
                    float(logprobs[0, token]),
                    top.indices.tolist() if top else [],
                    top.values.tolist() if top else [],
                )
            )
        return torch.full_like(scores, float("-inf")).scatter_(1, choice, 0.0)


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
    _steps: list = field(default_factory=list)  # filled by the sampler when params.logprobs
    _logprob_cursor: int = 0

    def cancel(self) -> None:
        self._stop_event.set()

    @property
    def done(self) -> bool:
        return self.usage.finish_reason is not None

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
        """The whole answer (non-streaming); with ``params.logprobs``, ``usage.logprobs`` holds its tokens."""
        answer = "".join(self)
        self.take_logprobs(len(answer))
        return answer

    def take_logprobs(self, answer_chars: int) -> list[TokenLogprob]:
        """The log-probabilities of the answer tokens that begin within its first ``answer_chars`` characters
        and were not taken before (streaming hands them out chunk by chunk); also appended to ``usage``.
        Tokens cut off with a stop sequence are not part of the answer."""
        if not self.params.logprobs:
            return []
        steps = list(self._steps)
        tok = self.engine.tokenizer
        ids = [s[0] for s in steps]
        full = tok.decode(ids, skip_special_tokens=True)
        lead = len(full) - len(full.lstrip())  # the answer's leading whitespace is trimmed
        end = lead + answer_chars
        taken: list[TokenLogprob] = []
        start = len(tok.decode(ids[: self._logprob_cursor], skip_special_tokens=True))
        i = self._logprob_cursor
        while i < len(steps):
            stop = len(tok.decode(ids[: i + 1], skip_special_tokens=True))
            if start >= end:
                break
            if stop > start:  # special tokens (EOS) decode to nothing and are not part of the text
                token, logprob, top_ids, top_lps = steps[i]
                taken.append(
                    TokenLogprob(
                        *self.engine.token_text(token),
                        logprob=logprob,
                        top=tuple((*self.engine.token_text(t), lp) for t, lp in zip(top_ids, top_lps, strict=True)),
                    )
                )
            i += 1
            start = stop
        self._logprob_cursor = i
        self.usage.logprobs.extend(taken)
        return taken

    def _generate(self, streamer: TextIteratorStreamer) -> None:
        p = self.params
        generator = torch.Generator(device=self.input_ids.device)
        if p.seed is None:
            generator.seed()  # fresh entropy, without touching the global RNG
        else:
            generator.manual_seed(p.seed)
        prompt_len = self.input_ids.shape[-1]
        kwargs: dict = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "max_new_tokens": p.max_new_tokens,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_Control(prompt_len, self.usage, self._stop_event)]),
            "logits_processor": LogitsProcessorList([_Sampler(p, prompt_len, generator, self._steps)]),
            "pad_token_id": self.engine.pad_token_id,
            # the sampler decides; the search around it only takes the one finite score
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
        }
        try:
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
        # the logits' width (may exceed the tokenizer's length by padding rows), the range of logit_bias keys
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
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

    def token_text(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        """A token's text and exact bytes (OpenAI's ``token`` and ``bytes`` of a logprob)."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        table = _byte_level_decoder()
        if isinstance(piece, str) and piece and all(ch in table for ch in piece):
            raw = bytes(table[ch] for ch in piece)
        else:
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        return raw.decode("utf-8", errors="replace"), tuple(raw)

    def _encode(self, turns: Sequence[Turn]) -> dict:
        # a chat template writes its own special tokens; the Human/Assistant format is tokenized as in training
        return self.tokenizer(self.prompt(turns), return_tensors="pt", add_special_tokens=self.human_format)

    def start(self, turns: Sequence[Turn], params: GenerationParams) -> AnswerStream:
        """Tokenize and check the conversation now (so errors surface before any response is sent); the model
        runs when the returned stream is iterated. A conversation that leaves less than ``max_new_tokens`` of
        room loses its oldest exchanges (:func:`~kuberlhf.serving.prompting.fit_turns`; ``usage.dropped_turns``
        says how many); ``max_new_tokens`` is then clipped to the room left."""
        for token_id, _ in params.logit_bias:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidParamError(
                    "logit_bias",
                    f"'logit_bias' names token {token_id}, outside this model's vocabulary 0..{self.vocab_size - 1}",
                )
        kept, dropped = fit_turns(
            turns, lambda ts: int(self._encode(ts)["input_ids"].shape[-1]), self.max_context, params.max_new_tokens
        )
        enc = self._encode(kept)
        prompt_len = int(enc["input_ids"].shape[-1])
        room = self.max_context - prompt_len
        if room < 1:
            raise PromptTooLongError(
                f"the last message is {prompt_len} tokens, but the model's context is {self.max_context} tokens: "
                "shorten it"
            )
        if dropped:
            log.info("left out the %d oldest turn(s) so that the conversation fits the context", dropped)
        params = replace(params, max_new_tokens=max(1, min(params.max_new_tokens, room)))
        return AnswerStream(
            engine=self,
            input_ids=enc["input_ids"].to(self.device),
            attention_mask=enc["attention_mask"].to(self.device),
            params=params,
            stops=stop_strings(params.stop, self.human_format),
            usage=Usage(prompt_tokens=prompt_len, dropped_turns=dropped),
        )
