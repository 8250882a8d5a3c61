"""The OpenAI chat-completions wire format: request models and pure builders of the response, chunk and error
objects (https://platform.openai.com/docs/api-reference/chat). No torch, no web framework."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 4


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send many optional fields (penalties, logit_bias, user, ...): accepted and ignored, so any
    # client works; fields we cannot honour and that change the answer's shape (n > 1) are refused.
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error object, as its clients parse it into e.g. ``BadRequestError``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_param(loc: Sequence[Any]) -> str | None:
    """A pydantic error location as OpenAI names the parameter: ('body', 'messages', 0, 'role') ->
    'messages.0.role'. Union-branch labels (e.g. 'str', 'list[TextPart]') are dropped."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in {"str", "int", "float", "bool"}))]
    return ".".join(parts) or None


def completion_object(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_object(prompt_tokens, completion_tokens),
    }


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chunk_object(
    completion_id: str,
    created: int,
    model: str,
    delta: dict | None,
    finish_reason: str | None = None,
    usage: dict | None = None,
    with_usage: bool = False,
) -> dict:
    """One ``chat.completion.chunk``. ``delta=None`` makes the final usage-only chunk (empty choices), sent
    when the request asked for ``stream_options.include_usage``."""
    chunk: dict = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None or with_usage:
        # with stream_options.include_usage every chunk has "usage": null except the last, usage-only one
        chunk["usage"] = usage
    return chunk


def model_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "kuberlhf"}]}
