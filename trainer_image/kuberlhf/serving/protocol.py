"""The OpenAI chat-completions wire format: request models and pure builders of the response, chunk and error
objects (https://platform.openai.com/docs/api-reference/chat). No torch, no web framework."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 4
# how many of the oldest messages the server left out so that the conversation fits the model's context
DROPPED_TURNS_HEADER = "X-Kuberlhf-Dropped-Turns"
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
# torch.Generator.manual_seed takes any value that fits 64 bits, signed or not
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def _utf8(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); they are not text and no tokenizer can encode them
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains a lone surrogate (\\u{ord(exc.object[exc.start]):04x}) at character {exc.start}, "
            "which is not valid Unicode: send UTF-8 text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(BaseModel):
    """What this server honours, with OpenAI's ranges. Fields that would change what the answer is (tools,
    structured output, audio, several choices) are declared so that the server can refuse them by name
    (:data:`UNSUPPORTED`); fields that only describe the caller (``user``, ``metadata``, ``store``...) are
    ignored."""

    model_config = ConfigDict(extra="ignore")

    model: Text
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: (
        dict[Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,8})$")], Annotated[float, Field(ge=-100, le=100)]] | None
    ) = None
    # refused when set (see UNSUPPORTED): declared so that their presence is seen, typed loosely so that the
    # refusal, not a type error, is what the client gets
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported_field(self) -> tuple[str, str] | None:
        """(field, why) of the first field set to something this server cannot do, else None."""
        for name, why in UNSUPPORTED.items():
            value = getattr(self, name)
            if value is None or value == [] and name != "tools":
                continue
            if name == "tool_choice" and value == "none":
                continue
            if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
                continue
            if name == "modalities" and value == ["text"]:
                continue
            return name, why
        return None


# What a sampling server of a plain language model cannot do, and what the caller can do instead.
UNSUPPORTED = {
    "tools": "tool calling is not supported by this server (the model was not trained to call tools): "
    "send the request without 'tools'",
    "tool_choice": "tool calling is not supported by this server: send the request without 'tool_choice'",
    "functions": "function calling is not supported by this server: send the request without 'functions'",
    "function_call": "function calling is not supported by this server: send the request without 'function_call'",
    "response_format": "structured output (response_format json_object / json_schema) is not supported by this "
    "server: only {'type': 'text'} is; parse the text answer yourself",
    "audio": "audio output is not supported by this server: send the request without 'audio'",
    "modalities": "only the 'text' modality is supported by this server",
}


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
    logprobs: dict | None = None,
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
                "logprobs": logprobs,
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
    logprobs: dict | None = None,
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
        else [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if usage is not None or with_usage:
        # with stream_options.include_usage every chunk has "usage": null except the last, usage-only one
        chunk["usage"] = usage
    return chunk


def model_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_object(model_id, created)]}


def logprobs_object(entries: Sequence[Any]) -> dict:
    """A choice's ``logprobs`` from :class:`kuberlhf.serving.params.TokenLogprob` entries."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.bytes),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "kuberlhf"}


# --- response shapes, for the OpenAPI document (/openapi.json) -------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobObject(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobObject]
    refusal: None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"]


class UsageObject(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: UsageObject
