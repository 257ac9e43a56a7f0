"""`tandem run`'s chat driven through a pseudo-terminal 40 columns wide, as a person uses it:
answers wrapped without breaking words, Ctrl-C at the prompt and during an answer (the
conversation survives both), history recalled with Up, /bye. Real SmolLM2, greedy."""

from __future__ import annotations

import os
import re
import socket
import sys

import pytest
from conftest import REPO

pexpect = pytest.importorskip("pexpect", reason="pexpect drives the pseudo-terminal")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]|\r(?!\n)")
PROMPT = ">>> "


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def spawn(path, tmp_path, *flags: str):
    env = {
        **os.environ,
        "TANDEM_HOME": str(tmp_path),  # the history file goes here
        "TANDEM_HOST": closed_port(),  # no server answers: the model loads in the process
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "TERM": "xterm",
        "TANDEM_QUIET": "1",
    }
    argv = ["-m", "runtime.cli.main", "run", str(path), "--temperature", "0", "-c", "1024"]
    return pexpect.spawn(
        sys.executable,
        [*argv, *flags],
        cwd=str(REPO),
        env=env,
        dimensions=(24, 40),
        encoding="utf-8",
        timeout=240,
    )


def plain(text: str) -> str:
    return ANSI.sub("", text)


def ask(child, line: str) -> str:
    """Send a line and return what came back until the next prompt (escapes removed)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before


def prompt_count(text: str) -> int:
    match = re.search(r"prompt eval count:\s+(\d+) token", plain(text))
    assert match, plain(text)
    return int(match[1])


def test_chat_in_a_pty(smollm2_path, tmp_path):
    child = spawn(smollm2_path, tmp_path, "--verbose")
    child.expect_exact(PROMPT)
    assert "Set parameter" in ask(child, "/set parameter num_predict 48")

    # a long answer at 40 columns: every line the program wrote fits (a line longer than
    # the terminal would be broken by it, mid-word)
    first = ask(child, "Tell me a story about a dragon and a knight.")
    answer = plain(first).split("\n", 1)[1].split("total duration")[0]
    lines = [line.rstrip("\r") for line in answer.split("\n")]
    assert sum(len(line.split()) for line in lines) > 15, lines
    assert all(len(line) <= 40 for line in lines), lines
    assert any(len(line) > 25 for line in lines), lines  # it did fill lines
    p1 = prompt_count(first)

    # Ctrl-C at the prompt clears the line, and the chat goes on
    child.send("half a line")
    child.sendcontrol("c")
    child.expect_exact("Use Ctrl + d or /bye to exit.")
    child.expect_exact(PROMPT)

    # Ctrl-C during an answer stops it; the earlier turn is still in the conversation
    assert "Set parameter" in ask(child, "/set parameter num_predict 2000")
    child.sendline("Now write a very long poem about the sea, with many verses.")
    child.expect(r"\S{3}")  # the answer has begun
    child.sendcontrol("c")
    child.expect_exact(PROMPT, timeout=60)
    assert "Set parameter" in ask(child, "/set parameter num_predict 2")
    follow = ask(child, "What was the story about?")
    # the follow-up's prompt holds the first turn (its question and answer) too
    assert prompt_count(follow) > p1 + 30, (p1, plain(follow))

    # Up recalls the last message from the history
    child.send("\x1b[A")
    child.expect_exact("What was the story about?")
    again = ask(child, "")
    assert prompt_count(again) > prompt_count(follow)  # the conversation grew by one turn

    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "What was the story about?" in (tmp_path / "history").read_text()


def test_nowordwrap_leaves_lines_to_the_terminal(smollm2_path, tmp_path):
    """The check above can fail: unwrapped, the same answer has lines wider than 40."""
    child = spawn(smollm2_path, tmp_path, "--nowordwrap")
    child.expect_exact(PROMPT)
    ask(child, "/set parameter num_predict 48")
    out = plain(ask(child, "Tell me a story about a dragon and a knight."))
    lines = out.split("\n", 1)[1].split("\n")
    assert any(len(line.rstrip("\r")) > 40 for line in lines), lines
    child.sendline("/bye")
    child.expect(pexpect.EOF)
