"""Pure pieces of the chat: prompt building, the streaming stop-cut, request/response shapes, model checks."""

from __future__ import annotations

import json
import random

import pytest

from kuberlhf.data.format import cut_at_next_turn, format_conversation
from kuberlhf.serving.limits import AdmissionLimiter
from kuberlhf.serving.model_source import ModelSourceError, check_hf_model_dir, is_uri, model_display_name
from kuberlhf.serving.prompting import StopScanner, build_prompt, cut_answer, stop_strings
from kuberlhf.serving.protocol import ChatCompletionRequest, chunk_object, completion_object, validation_param
from kuberlhf.serving.repl import normalise_endpoint


def chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


GENERATED = [
    " Paris is the capital. Human: and Germany?",
    "  no stop at all  ",
    "Hum",
    " Humans are fine. Human: next",
    " ends with a partial Hum",
    " spaces  \n\n Human:",
    " Human: right away",
    " a\tb  c",
]


@pytest.mark.parametrize("text", GENERATED)
def test_streamed_pieces_add_up_to_the_non_streaming_cut(text: str) -> None:
    rng = random.Random(text)
    for _ in range(50):
        scanner = StopScanner(["Human:"])
        pieces = [scanner.feed(c) for c in chunks(text, rng)] + [scanner.finish()]
        assert "".join(pieces) == cut_at_next_turn(text)
        # nothing that could still turn into "Human:" is ever shown
        assert all("Human:" not in p for p in pieces)


def test_partial_stop_prefix_is_held_back_until_resolved() -> None:
    scanner = StopScanner(["Human:"])
    assert scanner.feed(" Hello Hu") == "Hello"
    assert scanner.feed("m") == ""
    assert scanner.feed("an: more") == ""
    assert scanner.stopped
    assert scanner.finish() == ""
    scanner = StopScanner(["Human:"])
    assert scanner.feed("Hum") == ""
    assert scanner.feed("ble") == "Humble"


def test_user_stop_sequences_cut_too() -> None:
    assert cut_answer(" one. two. three", ["two"]) == "one."
    assert cut_answer(" a END b Human: c", stop_strings(["END"], human_format=True)) == "a"
    assert stop_strings(None, human_format=False) == []
    assert stop_strings(["x", ""], human_format=True) == ["x", "Human:"]


def test_prompt_uses_deepspeed_chat_format_without_a_template() -> None:
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")]
    assert build_prompt(turns) == format_conversation(turns)
    assert build_prompt(turns) == " Human: Be brief. Hi Assistant: Hello. Human: Bye Assistant:"
    # OpenAI's newer "developer" role is a system turn
    assert build_prompt([("developer", "Be brief."), ("user", "Hi")]) == " Human: Be brief. Hi Assistant:"


def test_prompt_uses_the_chat_template_when_there_is_one() -> None:
    seen = []

    def template(messages: list[dict[str, str]]) -> str:
        seen.append(messages)
        return "|".join(f"{m['role']}={m['content']}" for m in messages) + "|assistant="

    assert build_prompt([("user", "Hi")], template) == "user=Hi|assistant="
    assert seen == [[{"role": "user", "content": "Hi"}]]


def test_prompt_refuses_conversations_without_user_or_with_unknown_roles() -> None:
    with pytest.raises(ValueError, match="no user message"):
        build_prompt([("system", "x")])
    with pytest.raises(ValueError, match=r"messages\[1\].role is 'tool'"):
        build_prompt([("user", "x"), ("tool", "y")])


def test_request_model_and_param_names() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "stop": "x",
            "frequency_penalty": 0.5,
        }
    )
    assert req.messages[0].text() == "ab"
    assert req.stop_list() == ["x"]
    assert (
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 7}
        ).requested_max_tokens()
        == 7
    )
    assert validation_param(("body", "messages", 0, "role")) == "messages.0.role"
    assert validation_param(("body", "messages", 0, "content", "str")) == "messages.0.content"
    assert validation_param(("body",)) is None


def test_response_objects_have_openai_shape() -> None:
    done = completion_object("id1", 1, "m", "hi", "stop", 3, 2)
    assert done["object"] == "chat.completion"
    assert done["choices"][0]["message"] == {"role": "assistant", "content": "hi", "refusal": None}
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunk = chunk_object("id1", 1, "m", {"content": "x"})
    assert chunk["object"] == "chat.completion.chunk" and "usage" not in chunk
    assert chunk_object("id1", 1, "m", {"content": "x"}, with_usage=True)["usage"] is None
    assert chunk_object("id1", 1, "m", None, usage={"total_tokens": 1})["choices"] == []
    json.dumps(done)


def test_model_names_and_uris() -> None:
    assert is_uri("s3://b/x") and is_uri("file:///tmp/x") and not is_uri("/tmp/x")
    assert model_display_name("s3://bucket/ns/pipe/uid/ppo/ema/") == "ppo-ema"
    assert model_display_name("/runs/out/sft/model") == "sft-model"
    assert model_display_name("/models/opt-1.3b") == "opt-1.3b"
    assert normalise_endpoint("127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalise_endpoint("http://h:1/v1/") == "http://h:1/v1"


def test_model_dir_checks_name_the_problem(tmp_path, tiny_model_dir) -> None:
    check_hf_model_dir(tiny_model_dir)
    with pytest.raises(ModelSourceError, match="does not exist"):
        check_hf_model_dir(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelSourceError, match="not a Hugging Face model: it has no config.json"):
        check_hf_model_dir(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="incomplete checkpoint.*no weight files"):
        check_hf_model_dir(empty)
    (empty / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(ModelSourceError, match="model-00001-of-00002.safetensors"):
        check_hf_model_dir(empty)
    (empty / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="no tokenizer"):
        check_hf_model_dir(empty)


def test_admission_limiter_counts_running_and_waiting() -> None:
    limiter = AdmissionLimiter(concurrency=1, queue=1)
    assert limiter.try_admit() and limiter.try_admit()
    assert not limiter.try_admit()
    assert limiter.waiting == 1
    limiter.release(acquired=False)
    assert limiter.try_admit()
    with pytest.raises(ValueError):
        AdmissionLimiter(0, 0)


def test_repl_shows_control_characters_instead_of_sending_them_to_the_terminal() -> None:
    from kuberlhf.serving.repl import printable

    assert printable("a\x1b[2Jb\x00c\n\td") == "a\\x1b[2Jb\\x00c\n\td"
