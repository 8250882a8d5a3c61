"""The terminal chat: a REPL with multi-turn memory (`clear` resets, `quit` leaves) and a one-shot mode
(`--message`, repeatable) for scripts. The model answers either in process (:class:`LocalBackend`) or through
our server's OpenAI API with the official client (:class:`EndpointBackend`)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from kuberlhf.contract.stage import ENV_API_KEY
from kuberlhf.serving.params import GenerationParams
from kuberlhf.serving.protocol import DROPPED_TURNS_HEADER

CLEAR_WORDS = {"clear", "/clear", "reset"}
QUIT_WORDS = {"quit", "exit", "/quit", "/exit", ":q"}
USER_PROMPT = "Human: "
ASSISTANT_PREFIX = "Assistant: "


# Model output is untrusted text: control characters (ESC sequences included) are shown, not executed by the
# terminal. Newlines and tabs pass.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F]}


def printable(text: str) -> str:
    return text.translate(_CONTROL)


class ChatBackendError(RuntimeError):
    """A turn failed (context too long, server refused, ...); the REPL reports it and goes on."""


class Backend(Protocol):
    dropped: int  # oldest turns the last reply left out to fit the model's context

    def reply(self, turns: Sequence[tuple[str, str]], params: GenerationParams) -> Iterator[str]:
        """The answer to the conversation, in streamed pieces."""
        ...


@dataclass
class LocalBackend:
    """The model loaded in this process."""

    engine: Any  # kuberlhf.serving.engine.ChatEngine (typed loosely: importing it loads torch)
    dropped: int = 0

    def reply(self, turns: Sequence[tuple[str, str]], params: GenerationParams) -> Iterator[str]:
        try:
            stream = self.engine.start(turns, params)
        except ValueError as exc:
            raise ChatBackendError(str(exc)) from exc
        self.dropped = stream.usage.dropped_turns
        yield from stream


def normalise_endpoint(url: str) -> str:
    """The OpenAI base URL for a server address: 'http://host:8000' and '.../v1/' both give '.../v1'."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class EndpointBackend:
    """A `kuberlhf serve` (or any OpenAI-compatible) server, through the official `openai` client."""

    endpoint: str
    api_key: str | None = None
    model: str | None = None
    dropped: int = 0
    _client: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import openai

        key = self.api_key or os.environ.get(ENV_API_KEY) or os.environ.get("OPENAI_API_KEY") or "none"
        self._client = openai.OpenAI(base_url=normalise_endpoint(self.endpoint), api_key=key, max_retries=2)
        if self.model is None:
            try:
                models = self._client.models.list().data
            except openai.OpenAIError as exc:
                raise ChatBackendError(f"cannot reach {normalise_endpoint(self.endpoint)}: {exc}") from exc
            if not models:
                raise ChatBackendError(f"{self.endpoint} serves no model")
            self.model = models[0].id

    def reply(self, turns: Sequence[tuple[str, str]], params: GenerationParams) -> Iterator[str]:
        import openai

        kwargs: dict[str, Any] = {}
        if params.seed is not None:
            kwargs["seed"] = params.seed
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=[{"role": role, "content": text} for role, text in turns],
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stream=True,
                **kwargs,
            )
            self.dropped = int(raw.headers.get(DROPPED_TURNS_HEADER) or 0)
            for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except openai.APIStatusError as exc:
            raise ChatBackendError(_api_message(exc)) from exc
        except openai.OpenAIError as exc:
            raise ChatBackendError(str(exc)) from exc


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return f"{exc.status_code}: {err['message']}"
    return str(exc)


@dataclass
class Conversation:
    """Multi-turn memory: (role, text) pairs, user and assistant alternating."""

    turns: list[tuple[str, str]] = field(default_factory=list)
    told_dropped: bool = False

    def ask(self, backend: Backend, text: str, params: GenerationParams, out: TextIO) -> str:
        """Send one user turn, print the answer as it streams, remember both (nothing is remembered when the
        turn fails, so the user can retry or `clear`). Turns the model could no longer see (the backend left
        the oldest out to fit its context) are forgotten here too; the first time, the user is told."""
        turns = [*self.turns, ("user", text)]
        out.write(ASSISTANT_PREFIX)
        out.flush()
        pieces: list[str] = []
        try:
            for piece in backend.reply(turns, params):
                pieces.append(piece)
                out.write(printable(piece))
                out.flush()
        finally:
            out.write("\n")
            out.flush()
        answer = "".join(pieces)
        dropped = getattr(backend, "dropped", 0)
        self.turns = [*turns[dropped:], ("assistant", answer)]
        if dropped and not self.told_dropped:
            self.told_dropped = True
            out.write("(the conversation outgrew the model's context: the oldest turns are left out from now on)\n")
            out.flush()
        return answer

    def clear(self) -> None:
        self.turns = []
        self.told_dropped = False


def run_repl(
    backend: Backend,
    params: GenerationParams,
    *,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    banner: str = "",
) -> int:
    """The interactive loop; returns the exit status."""
    out = out or sys.stdout  # looked up per call: test runners swap sys.stdout
    if read is input and sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # line editing and history for input(), where available
            import readline  # noqa: F401
    conversation = Conversation()
    if banner:
        out.write(banner + "\n")
    out.write("Type a message and press Enter. `clear` starts a new conversation, `quit` leaves.\n")
    out.flush()
    while True:
        try:
            line = read(USER_PROMPT)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            return 130
        text = line.strip()
        if not text:
            continue
        if text.lower() in QUIT_WORDS:
            out.write("Bye.\n")
            return 0
        if text.lower() in CLEAR_WORDS:
            conversation.clear()
            out.write("(conversation cleared)\n")
            out.flush()
            continue
        try:
            conversation.ask(backend, text, params, out)
        except ChatBackendError as exc:
            out.write(f"error: {exc}\n(type `clear` to start a new conversation)\n")
        except KeyboardInterrupt:
            out.write("\n(interrupted)\n")
        out.flush()


def run_messages(backend: Backend, messages: Sequence[str], params: GenerationParams, out: TextIO | None = None) -> int:
    """Non-interactive: one conversation of the given user messages, each printed with its answer."""
    out = out or sys.stdout
    conversation = Conversation()
    for text in messages:
        out.write(f"{USER_PROMPT}{text}\n")
        try:
            conversation.ask(backend, text, params, out)
        except ChatBackendError as exc:
            out.write(f"error: {exc}\n")
            return 1
    return 0
