"""`kuberlhf chat` as a person uses it: a real pseudo-terminal (pexpect) running the REPL, and the one-shot
`--message` mode the runner uses when there is no TTY."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pexpect

from serving.servers import ServerProcess, kuberlhf_bin

PROMPT = "Human: "
LOAD_TIMEOUT_S = 180


def test_repl_two_turns_clear_and_quit(tiny_model_dir, tmp_path) -> None:
    transcript = (tmp_path / "repl.log").open("w")
    child = pexpect.spawn(
        kuberlhf_bin(),
        ["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--temperature", "0.8", "--top-p", "0.9"],
        env={**os.environ, "TERM": "dumb"},
        encoding="utf-8",
        codec_errors="replace",
        timeout=60,
        dimensions=(40, 200),
    )
    child.logfile_read = transcript
    try:
        child.expect("`clear` starts a new conversation, `quit` leaves", timeout=LOAD_TIMEOUT_S)
        child.expect_exact(PROMPT)

        child.sendline("Hello there")
        child.expect(r"Assistant: [^\n]*\r?\n")
        child.expect_exact(PROMPT)

        child.sendline("And a second question?")
        child.expect(r"Assistant: [^\n]*\r?\n")
        child.expect_exact(PROMPT)

        child.sendline("clear")
        child.expect_exact("(conversation cleared)")
        child.expect_exact(PROMPT)

        child.sendline("After clearing")
        child.expect(r"Assistant: [^\n]*\r?\n")
        child.expect_exact(PROMPT)

        child.sendline("quit")
        child.expect_exact("Bye.")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close()
        transcript.close()
    assert child.exitstatus == 0, (tmp_path / "repl.log").read_text()
    log = (tmp_path / "repl.log").read_text()
    assert log.count("Assistant: ") == 3
    assert "Traceback" not in log


def test_chat_against_the_server_endpoint(chat_server: ServerProcess) -> None:
    """`--endpoint` talks to our server through the official openai client (API key from the env)."""
    env = {**os.environ, "KUBERLHF_API_KEY": chat_server.api_key or ""}
    proc = subprocess.run(
        [kuberlhf_bin(), "chat", "--endpoint", chat_server.url, "-m", "Hi", "-m", "Again", "--max-new-tokens", "5"],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^Assistant:", proc.stdout, flags=re.M) == ["Assistant:", "Assistant:"]

    wrong = subprocess.run(
        [kuberlhf_bin(), "chat", "--endpoint", chat_server.url, "-m", "Hi"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "KUBERLHF_API_KEY": "wrong"},
    )
    assert wrong.returncode != 0
    assert "API key" in wrong.stderr


def test_chat_needs_exactly_one_source() -> None:
    proc = subprocess.run([kuberlhf_bin(), "chat"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--model" in proc.stderr and "--endpoint" in proc.stderr


def test_cli_module_does_not_import_torch() -> None:
    code = "import sys, kuberlhf.serving.cli; sys.exit(int(any(m in sys.modules for m in ('torch', 'transformers'))))"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
