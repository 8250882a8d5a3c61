"""Generation settings and accounting shared by the server, the REPL and the engine (no torch here, so the web
app and the CLI import them cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


class PromptTooLongError(ValueError):
    """The conversation leaves no room for an answer in the model's context window."""


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length", set when the stream ends

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
