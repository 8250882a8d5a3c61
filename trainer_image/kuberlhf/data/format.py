"""DeepSpeed-Chat's conversation format, shared by the data layer (training) and the chat server/REPL
(inference) so the model is prompted exactly as it was trained. Pure string functions, no torch."""

from __future__ import annotations

from collections.abc import Sequence

HUMAN = "Human:"
ASSISTANT = "Assistant:"


def format_prompt(prompt: str) -> str:
    """One user turn as a training/inference prompt: ' Human: {text} Assistant:'. A prompt that already
    carries the Human/Assistant markers (as Dahoas/rm-static's do) is kept, stripped of trailing space."""
    text = prompt.strip()
    if HUMAN in text and text.endswith(ASSISTANT):
        return " " + text
    return f" {HUMAN} {text} {ASSISTANT}"


def format_response(response: str) -> str:
    """An assistant answer as it follows the prompt: ' {text}'."""
    return " " + response.strip()


def format_conversation(turns: Sequence[tuple[str, str]]) -> str:
    """A multi-turn prompt from (role, text) pairs, role in {'user', 'assistant'} (system turns are prefixed
    to the first user turn); ends with 'Assistant:' for the model to continue."""
    parts: list[str] = []
    system = ""
    for role, text in turns:
        if role == "system":
            system = (system + " " + text.strip()).strip()
        elif role == "user":
            body = f"{system} {text.strip()}".strip() if system else text.strip()
            system = ""
            parts.append(f"{HUMAN} {body}")
        elif role == "assistant":
            parts.append(f"{ASSISTANT} {text.strip()}")
        else:
            raise ValueError(f"unknown role {role!r}: expected system, user or assistant")
    return " " + " ".join(parts) + f" {ASSISTANT}"


def cut_at_next_turn(generated: str) -> str:
    """The assistant's answer only: cut at the next 'Human:' (the model starting the user's turn)."""
    idx = generated.find(HUMAN)
    return (generated if idx < 0 else generated[:idx]).strip()
