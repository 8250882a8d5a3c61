"""The model in process: generation settings honoured, chat templates used when present, checkpoints resolved
from file:// and s3:// (real SeaweedFS) through the object store, and the CLI's one-shot mode."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kuberlhf.serving.engine import ChatEngine
from kuberlhf.serving.model_source import ModelSourceError, resolve_model
from kuberlhf.serving.params import GenerationParams, PromptTooLongError
from kuberlhf.storage import ObjectStore
from serving.servers import kuberlhf_bin

TURNS = [("user", "Tell me something.")]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> ChatEngine:
    return ChatEngine(tiny_model_dir, device="cpu")


def test_seeded_sampling_is_reproducible_and_greedy_is_deterministic(engine: ChatEngine) -> None:
    params = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    first = engine.start(TURNS, params)
    text = first.text()
    assert engine.start(TURNS, params).text() == text
    assert first.usage.finish_reason in {"stop", "length"}
    greedy = GenerationParams(max_new_tokens=12, temperature=0)
    assert engine.start(TURNS, greedy).text() == engine.start(TURNS, greedy).text()


def test_streaming_pieces_equal_the_whole_answer(engine: ChatEngine) -> None:
    params = GenerationParams(max_new_tokens=20, seed=5)
    pieces = list(engine.start(TURNS, params))
    assert "".join(pieces) == engine.start(TURNS, params).text()


def test_stop_sequence_ends_generation_early(engine: ChatEngine) -> None:
    params = GenerationParams(max_new_tokens=60, seed=5)
    free = engine.start(TURNS, params)
    text = free.text()
    # a stop early in the answer, after a space (the streamer releases text word by word)
    words = text.split(" ")
    assert len(words) > 3, text
    stop = " " + words[1][:2]
    cut = engine.start(TURNS, GenerationParams(max_new_tokens=60, seed=5, stop=(stop,)))
    answer = cut.text()
    assert stop not in answer
    assert text.startswith(answer) and len(answer) < len(text)
    assert cut.usage.finish_reason == "stop"
    assert cut.usage.completion_tokens < free.usage.completion_tokens


def test_cancel_stops_the_model(engine: ChatEngine) -> None:
    stream = engine.start(TURNS, GenerationParams(max_new_tokens=400, temperature=0, stop=("\x00never",)))
    it = iter(stream)
    next(it)
    stream.cancel()
    list(it)
    assert stream.usage.completion_tokens < 400


def test_prompt_longer_than_the_context_is_refused(engine: ChatEngine) -> None:
    with pytest.raises(PromptTooLongError, match="context is 512 tokens"):
        engine.start([("user", "word " * 1000)], GenerationParams())
    # a long-but-fitting prompt gets max_new_tokens clipped to the room left
    stream = engine.start([("user", "word " * 240)], GenerationParams(max_new_tokens=10_000, temperature=0))
    assert stream.params.max_new_tokens == 512 - stream.usage.prompt_tokens


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "templated"
    shutil.copytree(tiny_model_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    templated = ChatEngine(model_dir, device="cpu")
    assert not templated.human_format
    assert templated.prompt(TURNS) == "<|user|>Tell me something.\n<|assistant|>"
    assert templated.start(TURNS, GenerationParams(max_new_tokens=4, seed=1)).text() is not None


def test_human_assistant_format_without_a_template(engine: ChatEngine) -> None:
    assert engine.human_format
    assert engine.prompt(TURNS) == " Human: Tell me something. Assistant:"


def test_file_uri_checkpoint_is_downloaded_and_served(tiny_model_dir: Path, tmp_path: Path) -> None:
    uri = (tmp_path / "store").as_uri() + "/ns/pipe/uid/ppo/ema"
    ObjectStore.from_uri(uri).upload_dir(tiny_model_dir, uri, producer="test")
    local = resolve_model(uri, cache_dir=tmp_path / "cache")
    assert (local / "config.json").is_file()
    assert ChatEngine(local, device="cpu").start(TURNS, GenerationParams(max_new_tokens=3, seed=0)).text() is not None


def test_s3_checkpoint_is_downloaded(s3_env, s3_bucket: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/ns/pipe/uid/ppo/model"
    store = ObjectStore.from_uri(uri, endpoint=s3_env.endpoint)
    store.upload_dir(tiny_model_dir, uri, producer="test")
    local = resolve_model(uri, endpoint=s3_env.endpoint, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in local.iterdir() if p.name != "_COMPLETE") >= sorted(
        p.name for p in tiny_model_dir.iterdir()
    )
    # an unfinished checkpoint (no _COMPLETE) is refused with a clear message
    partial = f"{s3_bucket}/ns/pipe/uid/sft/model"
    store.upload_dir(tiny_model_dir, partial, producer="test", commit=False)
    with pytest.raises(ModelSourceError, match="incomplete checkpoint at .*_COMPLETE"):
        resolve_model(partial, endpoint=s3_env.endpoint, cache_dir=tmp_path / "cache2")
    # pointing at the stage instead of its model/ gets a hint
    with pytest.raises(ModelSourceError, match="did you mean .*ppo/model/"):
        resolve_model(f"{s3_bucket}/ns/pipe/uid/ppo", endpoint=s3_env.endpoint, cache_dir=tmp_path / "cache3")


def test_serve_exits_when_the_checkpoint_is_incomplete(tiny_model_dir: Path, tmp_path: Path) -> None:
    uri = (tmp_path / "store").as_uri() + "/ns/pipe/uid/ppo/model"
    ObjectStore.from_uri(uri).upload_dir(tiny_model_dir, uri, producer="test", commit=False)
    proc = subprocess.run(
        [kuberlhf_bin(), "serve", "--model", uri, "--port", "0", "--cache-dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "incomplete checkpoint" in proc.stderr and "_COMPLETE" in proc.stderr


def test_message_mode_keeps_one_conversation(tiny_model_dir: Path) -> None:
    """`kuberlhf chat --model DIR --message ... --message ...` (what the runner prints at the end), in process."""
    from kuberlhf.cli import app

    result = CliRunner().invoke(
        app, ["chat", "--model", str(tiny_model_dir), "-m", "First?", "-m", "Second?", "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Human: First?"
    assert lines[1].startswith("Assistant:")
    assert "Human: Second?" in lines
    assert sum(line.startswith("Assistant:") for line in lines) == 2


def test_message_mode_drops_the_oldest_turns_and_says_so_once(tiny_model_dir: Path) -> None:
    """Five ~150-token questions do not fit the 512-token context: the oldest go, with one notice."""
    from kuberlhf.cli import app

    questions = [f"{i} " + "word " * 150 for i in range(5)]
    args = ["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--seed", "1"]
    for q in questions:
        args += ["-m", q]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("the oldest turns are left out") == 1
    assert sum(line.startswith("Assistant:") for line in result.stdout.splitlines()) == 5


def test_generation_leaves_the_global_rng_alone(engine: ChatEngine) -> None:
    import torch

    before = torch.get_rng_state()
    engine.start(TURNS, GenerationParams(max_new_tokens=8, temperature=1.0)).text()
    engine.start(TURNS, GenerationParams(max_new_tokens=8, temperature=1.0, seed=3)).text()
    assert torch.equal(torch.get_rng_state(), before)
