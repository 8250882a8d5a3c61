"""Prompt building and answer cutting, shared by the server, the REPL and the tests. Pure functions, no torch.

A model whose tokenizer has a chat template is prompted with that template; otherwise with DeepSpeed-Chat's
" Human: ... Assistant:" format, exactly as our stages train (:mod:`kuberlhf.data.format`). In that format the
model does not stop by itself at the end of its turn, so the answer is cut at the next "Human:"."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kuberlhf.data.format import HUMAN, format_conversation

# OpenAI's "developer" role is the newer name of "system".
ROLE_ALIASES = {"developer": "system"}
ROLES = ("system", "user", "assistant")

Turn = tuple[str, str]
ChatTemplate = Callable[[list[dict[str, str]]], str]


def normalise_turns(turns: Iterable[Turn]) -> list[Turn]:
    """(role, text) pairs with role aliases resolved; raises ValueError naming the turn for an unknown role."""
    out: list[Turn] = []
    for i, (role, text) in enumerate(turns):
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}: expected one of system, developer, user, assistant")
        out.append((role, text))
    return out


def build_prompt(turns: Sequence[Turn], chat_template: ChatTemplate | None = None) -> str:
    """The text the model continues: the tokenizer's chat template (with the generation prompt) when given,
    else the DeepSpeed-Chat Human/Assistant format."""
    turns = normalise_turns(turns)
    if not any(role == "user" for role, _ in turns):
        raise ValueError("messages has no user message: add at least one {'role': 'user', 'content': ...}")
    if chat_template is not None:
        return chat_template([{"role": role, "content": text} for role, text in turns])
    return format_conversation(turns)


def fit_turns(
    turns: Sequence[Turn], prompt_tokens: Callable[[Sequence[Turn]], int], max_context: int, reserve: int
) -> tuple[list[Turn], int]:
    """The conversation that fits: while the prompt plus ``reserve`` answer tokens exceed ``max_context``, the
    oldest exchange (a user message and the assistant turns after it) is left out. System messages and the
    last user message (with whatever follows it) are always kept; if they alone do not fit, the caller clips
    the answer or refuses. Returns the kept turns and how many turns were left out."""
    turns = list(turns)
    kept = list(turns)
    while prompt_tokens(kept) + reserve > max_context:
        users = [i for i, (role, _) in enumerate(kept) if ROLE_ALIASES.get(role, role) == "user"]
        if len(users) < 2:
            break
        # drop everything non-system from the start up to (not including) the second user message
        kept = [t for i, t in enumerate(kept) if i >= users[1] or ROLE_ALIASES.get(t[0], t[0]) == "system"]
    return kept, len(turns) - len(kept)


def stop_strings(user_stops: Sequence[str] | None, human_format: bool) -> list[str]:
    """Where the answer ends: the caller's stop sequences, plus "Human:" in the Human/Assistant format."""
    stops = [s for s in (user_stops or []) if s]
    if human_format and HUMAN not in stops:
        stops.append(HUMAN)
    return stops


@dataclass
class StopScanner:
    """Turns a stream of generated text pieces into the answer's pieces, cut before the first stop sequence.

    Streaming must show the same answer as a non-streaming call (``cut_at_next_turn`` for "Human:"): leading
    whitespace is dropped, and text that could be the start of a stop sequence ("Hum") or trailing whitespace
    is held back until the next piece shows what it is. Non-streaming joins the same pieces, so both agree by
    construction."""

    stops: Sequence[str]
    stopped: bool = False
    _pending: str = ""
    _started: bool = False
    _held: list[str] = field(default_factory=list)

    def feed(self, piece: str) -> str:
        """The part of ``piece`` (with anything held back before) that is certainly answer text."""
        if self.stopped or not piece:
            return ""
        buf = self._pending + piece
        if not self._started:
            buf = buf.lstrip()
            if not buf:
                self._pending = ""
                return ""
            self._started = True
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return buf[:cut].rstrip()
        keep = self._holdback(buf)
        self._pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> str:
        """What is left at the end of generation (a held-back prefix that never became a stop sequence)."""
        rest = "" if self.stopped else self._pending.rstrip()
        self._pending = ""
        return rest

    def _holdback(self, buf: str) -> int:
        """How many trailing characters to hold: trailing whitespace, plus the longest suffix that is a proper
        prefix of a stop sequence."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:n]):
                    longest = max(longest, n)
                    break
        body = buf[: len(buf) - longest]
        trailing_ws = len(body) - len(body.rstrip())
        return longest + trailing_ws


def cut_answer(text: str, stops: Sequence[str]) -> str:
    """The whole answer from the whole generated text (what the streaming pieces add up to)."""
    scanner = StopScanner(stops)
    return scanner.feed(text) + scanner.finish()
