"""Every OpenAI request field either changes the answer as specified or is refused by name: the official `openai`
client against the real `kuberlhf serve`, with the implemented fields checked against a direct computation on
the same weights in this process (a greedy loop over the model's logits with OpenAI's formulas)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from serving.servers import ServerProcess

HELLO = [{"role": "user", "content": "Hello, who are you?"}]
NEVER = ["\x00never\x00"]  # a stop that never matches: every answer runs to max_tokens (or EOS)


@pytest.fixture()
def client(chat_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=chat_server.api, api_key=chat_server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    """A greedy decoder written out by hand: returns [(token id, model log-softmax at it)] for the prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kuberlhf.data.format import format_conversation

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    def decode(
        messages: list[dict],
        n: int,
        frequency: float = 0.0,
        presence: float = 0.0,
        bias: dict[int, float] | None = None,
    ) -> list[tuple[int, float]]:
        ids = tok(format_conversation([(m["role"], m["content"]) for m in messages]), return_tensors="pt").input_ids
        out: list[tuple[int, float]] = []
        with torch.no_grad():
            for _ in range(n):
                logits = model(ids).logits[0, -1].float()
                logprobs = torch.log_softmax(logits, -1)
                counts = torch.bincount(torch.tensor([t for t, _ in out], dtype=torch.long), minlength=logits.numel())
                adjusted = logits - counts * frequency - (counts > 0).float() * presence
                for token, b in (bias or {}).items():
                    adjusted[token] += b
                token = int(adjusted.argmax())
                if token == tok.eos_token_id:
                    break
                out.append((token, float(logprobs[token])))
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return out

    decode.tokenizer = tok  # type: ignore[attr-defined]
    return decode


def _served(choice) -> list[tuple[bytes, float]]:
    return [(bytes(e.bytes), e.logprob) for e in choice.logprobs.content]


def _expected(reference, tokens: list[tuple[int, float]]) -> list[tuple[bytes, float]]:
    from kuberlhf.serving.engine import _byte_level_decoder

    table = _byte_level_decoder()
    tok = reference.tokenizer
    return [(bytes(table[c] for c in tok.convert_ids_to_tokens(t)), lp) for t, lp in tokens]


def _assert_same_tokens(served: list[tuple[bytes, float]], expected: list[tuple[bytes, float]]) -> None:
    # the served answer ends where the reference does (trailing whitespace tokens trimmed with the content)
    assert served, "no logprobs returned"
    assert len(served) >= len(expected) - 2
    for (sb, slp), (eb, elp) in zip(served, expected, strict=False):
        assert sb == eb
        assert slp == pytest.approx(elp, abs=1e-4)


def test_logprobs_are_the_models_log_softmax(client: openai.OpenAI, reference) -> None:
    done = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=12, temperature=0, stop=NEVER, logprobs=True, top_logprobs=3
    )
    choice = done.choices[0]
    served = _served(choice)
    _assert_same_tokens(served, _expected(reference, reference(HELLO, 12)))
    for entry in choice.logprobs.content:
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy without penalties: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(tops[0], abs=1e-6)
    text = b"".join(b for b, _ in served).decode("utf-8", errors="replace")
    assert text.strip() == choice.message.content
    # streaming hands out the same entries, chunk by chunk
    stream = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=12, temperature=0, stop=NEVER, logprobs=True, stream=True
    )
    streamed = [
        (bytes(e.bytes), e.logprob)
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert streamed == served
    # without logprobs the field is null, as in OpenAI's answers
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_penalties_follow_openais_formula(client: openai.OpenAI, reference) -> None:
    plain = reference(HELLO, 16)
    penalised = reference(HELLO, 16, frequency=2.0, presence=1.5)
    assert [t for t, _ in penalised] != [t for t, _ in plain], "the penalties should change this greedy answer"
    done = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=16,
        temperature=0,
        stop=NEVER,
        logprobs=True,
        frequency_penalty=2.0,
        presence_penalty=1.5,
    )
    _assert_same_tokens(_served(done.choices[0]), _expected(reference, penalised))
    # the penalties' range is OpenAI's
    for field in ("frequency_penalty", "presence_penalty"):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, **{field: 2.5})
        assert err.value.body["param"] == field


def test_logit_bias_forces_and_bans_tokens(client: openai.OpenAI, reference) -> None:
    tok = reference.tokenizer
    forced = tok.convert_tokens_to_ids("a")
    done = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=6,
        temperature=0,
        stop=NEVER,
        logprobs=True,
        logit_bias={str(forced): 100},
    )
    assert done.choices[0].message.content == "a" * 6
    _assert_same_tokens(_served(done.choices[0]), _expected(reference, reference(HELLO, 6, bias={forced: 100})))
    # a ban on the greedy answer's first token changes it
    first = reference(HELLO, 1)[0][0]
    banned = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=4,
        temperature=0,
        stop=NEVER,
        logprobs=True,
        logit_bias={str(first): -100},
    )
    assert _served(banned.choices[0])[0][0] != _expected(reference, [(first, 0.0)])[0][0]
    for bias, param in (({"100000": 1}, "logit_bias"), ({"5": 101}, "logit_bias.5"), ({"x": 1}, "logit_bias.x")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, logit_bias=bias)
        assert err.value.body["param"].startswith(param), err.value.body


def test_top_p_zero_is_greedy(client: openai.OpenAI) -> None:
    greedy = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0, stop=NEVER)
    for seed in (1, 2):
        nucleus = client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=8, temperature=1, top_p=0, seed=seed, stop=NEVER
        )
        assert nucleus.choices[0].message.content == greedy.choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
            "response_format",
        ),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"seed": 1 << 64}, "seed"),
        ({"seed": -(1 << 63) - 1}, "seed"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ],
)
def test_fields_this_server_cannot_honour_are_refused(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, **kwargs)
    assert err.value.body["param"] == param
    if param not in {"seed", "top_logprobs"}:
        assert "not supported by this server" in err.value.body["message"]


def test_harmless_defaults_of_refused_fields_are_accepted(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=2,
        response_format={"type": "text"},
        tool_choice="none",
        seed=(1 << 64) - 1,
    )
    assert done.choices[0].message.role == "assistant"


def test_a_lone_surrogate_is_a_400_naming_the_field(chat_server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {chat_server.api_key}", "content-type": "application/json"}
    for body, param in (
        (b'{"model":"tiny","messages":[{"role":"user","content":"hi \\ud800"}]}', "messages.0.content"),
        (
            b'{"model":"tiny","messages":[{"role":"user","content":[{"type":"text","text":"\\udfff"}]}]}',
            "messages.0.content.0.text",
        ),
        (b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"stop":"\\ud800"}', "stop"),
    ):
        resp = httpx.post(chat_server.api + "/chat/completions", content=body, headers=headers, timeout=30)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == param
        assert "surrogate" in resp.json()["error"]["message"]


def test_get_model_by_id(client: openai.OpenAI) -> None:
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found"


def test_history_beyond_the_context_drops_the_oldest_turns(chat_server: ServerProcess, client: openai.OpenAI) -> None:
    """The documented rule: oldest exchanges go first, the system message and the last question stay."""
    filler = "word " * 120  # ~120 tokens a turn: 5 exchanges do not fit 512 tokens with room for 64
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(5):
        messages += [{"role": "user", "content": f"{i} {filler}"}, {"role": "assistant", "content": filler}]
    messages.append({"role": "user", "content": "And the last one?"})
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=64)
    dropped = int(raw.headers["x-kuberlhf-dropped-turns"])
    done = raw.parse()
    assert dropped % 2 == 0 and dropped >= 6
    assert done.usage.prompt_tokens + 64 <= 512
    kept = [messages[0], *messages[1 + dropped :]]
    assert client.chat.completions.create(model="tiny", messages=kept, max_tokens=1).usage.prompt_tokens == (
        done.usage.prompt_tokens
    )
    assert (
        "x-kuberlhf-dropped-turns"
        not in client.chat.completions.with_raw_response.create(model="tiny", messages=HELLO, max_tokens=1).headers
    )


def _in_flight(server: ServerProcess) -> float:
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    text = httpx.get(server.url + "/metrics", headers=headers, timeout=10).text
    line = next(ln for ln in text.splitlines() if ln.startswith("kuberlhf_serve_generations_in_flight "))
    return float(line.split()[-1])


def test_a_non_streaming_request_is_cancelled_when_its_client_goes_away(chat_server: ServerProcess) -> None:
    """A 400-token answer takes seconds here; the client hangs up once it runs, and the slot is free within 1 s."""
    body = (
        b'{"model":"tiny","messages":[{"role":"user","content":"Hello"}],"max_tokens":400,"temperature":0,'
        b'"stop":["\\u0000never"]}'
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {chat_server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    port = int(chat_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 30
        while _in_flight(chat_server) < 1:
            assert time.monotonic() < deadline, "the generation never started"
            time.sleep(0.05)
        time.sleep(0.3)
    gone = time.monotonic()
    while _in_flight(chat_server) > 0:
        assert time.monotonic() - gone < 1.0, "the slot is still busy 1 s after the client went away"
        time.sleep(0.05)
    assert "generation chatcmpl-" in chat_server.log() and "cancelled" in chat_server.log()
