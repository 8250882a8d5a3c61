"""Generation settings and accounting shared by the server, the REPL and the engine (no torch here, so the web
app and the CLI import them cheaply)."""

from __future__ import annotations

from dataclasses import dataclass, field


class InvalidParamError(ValueError):
    """A request parameter the model cannot take (e.g. a ``logit_bias`` token id outside its vocabulary)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(ValueError):
    """The conversation leaves no room for an answer in the model's context window."""


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 0 keeps only the most likely token
    stop: tuple[str, ...] = ()
    seed: int | None = None  # per request: a torch.Generator of its own, never the global RNG
    # OpenAI's penalties: logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty, where
    # count[t] is how often t occurs in the answer so far
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token with the model's log-probability of it (log-softmax of the raw logits, before
    penalties, bias, temperature and top-p) and the ``top`` most likely alternatives."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[tuple[str, tuple[int, ...], float], ...] = ()


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length", set when the stream ends
    dropped_turns: int = 0  # oldest turns left out so that the conversation fits the context
    logprobs: list[TokenLogprob] = field(default_factory=list)  # filled when params.logprobs

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
