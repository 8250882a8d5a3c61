"""The tools people point at an OpenAI-compatible server, unmodified, against the real `kuberlhf serve`:
LangChain (`langchain-openai`), litellm (streaming), and schemathesis fuzzing the server's own /openapi.json
(positive and negative examples, a bounded number: no 5xx and no response that contradicts the document)."""

from __future__ import annotations

import os

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from serving.servers import ServerProcess

QUESTION = "Tell me about the sea."


@pytest.fixture()
def chat_model(open_server: ServerProcess):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model="tiny", base_url=open_server.api, api_key="none", max_retries=0, max_tokens=8, temperature=0
    )


def test_langchain_invoke_and_stream(chat_model) -> None:
    answer = chat_model.invoke(QUESTION)
    assert isinstance(answer.content, str) and answer.content
    assert answer.usage_metadata["output_tokens"] > 0
    assert "".join(chunk.content for chunk in chat_model.stream(QUESTION)) == answer.content


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_langchain_structured_output_raises_instead_of_returning_none(chat_model, method: str) -> None:
    from pydantic import BaseModel

    class Answer(BaseModel):
        text: str

    structured = chat_model.with_structured_output(Answer if method != "json_mode" else None, method=method)
    with pytest.raises(openai.BadRequestError) as err:
        structured.invoke(QUESTION)
    param = "tools" if method == "function_calling" else "response_format"
    assert err.value.body["param"] == param
    assert "not supported by this server" in err.value.body["message"]


def test_langchain_bind_tools_raises(chat_model) -> None:
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    with pytest.raises(openai.BadRequestError) as err:
        chat_model.bind_tools([get_weather]).invoke("Weather in Paris?")
    assert err.value.body["param"] == "tools"


def test_litellm_streaming(open_server: ServerProcess) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    import litellm

    kwargs = {
        "model": "openai/tiny",
        "api_base": open_server.api,
        "api_key": "none",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "temperature": 0,
        "num_retries": 0,
    }
    chunks = list(litellm.completion(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert streamed == litellm.completion(**kwargs).choices[0].message.content
    with pytest.raises(litellm.BadRequestError):
        litellm.completion(response_format={"type": "json_object"}, **kwargs)


EXAMPLES = 50  # per operation and mode for the chat route (8 for the others): ~30 s on a loaded 2-core machine


def test_schemathesis_finds_no_server_error_and_no_mismatch(open_server: ServerProcess) -> None:
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(open_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/models", "/v1/models/{model}"}
    ran = 0
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES if op.path == "/v1/chat/completions" else 8,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def run(case) -> None:
                nonlocal ran
                ran += 1
                case.call_and_validate(base_url=open_server.url, timeout=60)

            try:
                run()
            except Unsatisfiable:
                # no invalid request exists for an operation without inputs (/healthz) or whose only input is
                # any string (/v1/models/{model}); positive examples must always be generated
                assert mode is GenerationMode.NEGATIVE and op.path != "/v1/chat/completions"
    assert ran >= 2 * EXAMPLES
