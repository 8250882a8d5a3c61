"""`kuberlhf serve` as a real process, driven by the official `openai` client (and plain HTTP for probes).
The tiny model has random weights: its answers are gibberish, so these tests assert the protocol, not content."""

from __future__ import annotations

import concurrent.futures
import subprocess
import threading
import time

import httpx
import openai
import pytest

from serving.servers import ServerProcess, kuberlhf_bin

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture()
def client(chat_server: ServerProcess) -> openai.OpenAI:
    # no retries: a 429 must reach the test, not be retried away
    return openai.OpenAI(base_url=chat_server.api, api_key=chat_server.api_key, max_retries=0, timeout=60)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].object == "model"


def test_non_streaming_completion(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, seed=7)
    assert done.object == "chat.completion"
    assert done.id.startswith("chatcmpl-")
    assert len(done.choices) == 1
    choice = done.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in {"stop", "length"}
    assert "Human:" not in choice.message.content
    assert done.usage.prompt_tokens > 0
    assert 0 < done.usage.completion_tokens <= 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    # same seed, same answer
    again = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, seed=7)
    assert again.choices[0].message.content == choice.message.content


def test_greedy_reaches_the_max_tokens_limit(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0)
    assert done.usage.completion_tokens == 5
    assert done.choices[0].finish_reason == "length"


def test_streaming_matches_openai_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=16, seed=7, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content_chunks, "no content streamed"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason in {"stop", "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    streamed = "".join(c.choices[0].delta.content for c in content_chunks)
    # the stream and a non-streaming call with the same seed give the same answer
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, seed=7)
    assert streamed == whole.choices[0].message.content


def auth(server: ServerProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.api_key}"}


def test_raw_sse_stream_ends_with_done(chat_server: ServerProcess) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", chat_server.api + "/chat/completions", json=body, headers=auth(chat_server), timeout=60
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: ") :] for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"


def test_multi_turn_conversation(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=1)
    single = client.chat.completions.create(model="tiny", messages=messages[-1:], max_tokens=8, seed=1)
    # the whole history is in the prompt
    assert done.usage.prompt_tokens > single.usage.prompt_tokens + 10
    assert done.choices[0].message.role == "assistant"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0.role"),
        ({"messages": HELLO, "temperature": 5}, "temperature"),
        ({"messages": HELLO, "n": 2}, "n"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "only a system turn"}]}, "messages"),
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_bad_requests_get_openai_400s(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error"
    assert err.value.body["param"] == param
    assert err.value.body["message"]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert err.value.body["code"] == "model_not_found"
    assert "tiny" in err.value.body["message"]


def test_invalid_json_and_unknown_route(chat_server: ServerProcess) -> None:
    resp = httpx.post(
        chat_server.api + "/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert "not valid JSON" in resp.json()["error"]["message"]
    resp = httpx.get(chat_server.api + "/nothing-here", headers=auth(chat_server))
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_oversized_body_is_413(client: openai.OpenAI) -> None:
    huge = [{"role": "user", "content": "x" * 100_000}]  # over the server's 64 KiB body limit
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="tiny", messages=huge)
    assert err.value.status_code == 413
    assert err.value.body["code"] == "request_too_large"


def test_conversation_longer_than_the_context_is_400(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "word " * 2000}]  # one message, under the byte limit, over 512 tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=long)
    assert err.value.body["code"] == "context_length_exceeded"
    assert err.value.body["param"] == "messages"


def test_max_tokens_above_the_server_cap_is_400(client: openai.OpenAI) -> None:
    # the server runs with --max-new-tokens 400: more is refused (as OpenAI refuses more than a model's limit)
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=HELLO, **{field: 401})
        assert err.value.body["param"] == field
        assert "at most 400" in err.value.body["message"]
    done = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=400, temperature=0, stop=["\x00"])
    assert done.usage.completion_tokens == 400
    assert done.choices[0].finish_reason == "length"


def test_api_key_is_enforced(chat_server: ServerProcess) -> None:
    bad = openai.OpenAI(base_url=chat_server.api, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="tiny", messages=HELLO)
    assert err.value.status_code == 401
    assert err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    resp = httpx.post(chat_server.api + "/chat/completions", json={"model": "tiny", "messages": HELLO})
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "invalid_request_error"
    # the probes stay open for the kubelet; the metrics need the key too (401 in OpenAI's error shape)
    assert httpx.get(chat_server.url + "/readyz").status_code == 200
    resp = httpx.get(chat_server.url + "/metrics")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(chat_server.url + "/metrics", headers=auth(chat_server)).status_code == 200


def test_probes_and_metrics(chat_server: ServerProcess, client: openai.OpenAI) -> None:
    assert httpx.get(chat_server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(chat_server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["model"] == "tiny"
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
    text = httpx.get(chat_server.url + "/metrics", headers=auth(chat_server)).text
    assert 'kuberlhf_serve_http_requests_total{method="POST",path="/v1/chat/completions",status="200"}' in text
    assert "kuberlhf_serve_completion_tokens_total" in text
    assert "kuberlhf_serve_chat_completion_seconds_bucket" in text
    assert "kuberlhf_serve_model_ready 1.0" in text
    completed = [ln for ln in text.splitlines() if ln.startswith("kuberlhf_serve_completion_tokens_total")]
    assert float(completed[0].split()[-1]) > 0


def test_concurrency_bound_queues_one_and_refuses_the_rest(chat_server: ServerProcess) -> None:
    """Server: 1 running + 1 waiting. A long stream holds the slot; of two more requests one waits (and is
    answered later), the other gets an OpenAI-style 429."""
    long_body = {
        "model": "tiny",
        "messages": HELLO,
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "stop": ["\x00never\x00"],
    }
    holding = threading.Event()
    release = threading.Event()

    def hold_slot() -> int:
        with httpx.stream(
            "POST", chat_server.api + "/chat/completions", json=long_body, headers=auth(chat_server), timeout=120
        ) as resp:
            lines = resp.iter_lines()
            next(lines)  # the role chunk: this request is admitted and generating
            holding.set()
            release.wait(30)
            return sum(1 for _ in lines)

    client = openai.OpenAI(base_url=chat_server.api, api_key=chat_server.api_key, max_retries=0, timeout=120)

    def short() -> object:
        try:
            return client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        except openai.RateLimitError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        holder = pool.submit(hold_slot)
        assert holding.wait(60)
        results = [pool.submit(short), pool.submit(short)]
        time.sleep(0.5)
        release.set()
        outcomes = [r.result(timeout=120) for r in results]
        assert holder.result(timeout=120) > 0
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(refused) == 1 and len(answered) == 1, outcomes
    assert refused[0].status_code == 429
    assert refused[0].body["code"] == "rate_limit_exceeded"
    assert answered[0].choices[0].message.role == "assistant"
    metrics = httpx.get(chat_server.url + "/metrics", headers=auth(chat_server)).text
    assert 'kuberlhf_serve_rejected_total{reason="busy"}' in metrics


def test_serve_refuses_a_missing_model_dir(tmp_path) -> None:
    proc = subprocess.run(
        [kuberlhf_bin(), "serve", "--model", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "s3://" in proc.stderr
