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
PROMPT = "Send a message (/? for help)"  # the empty prompt's placeholder
SET = r"Set parameter '\w+'"


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    """The native kernel built here first (into the TANDEM_BUILD_CACHE the child inherits):
    a child that compiles it under the pexpect timeout fails on a busy machine."""
    from kernels import native_loader

    native_loader.load()


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


def ask(child, line: str, until: str = r"\r\neval rate:\s+\S+") -> str:
    """Send a line and return what came back until `until` (default: the end of the
    --verbose figures, which close every answer)."""
    child.sendline(line)
    child.expect(until)
    return child.before + child.after


def answer_lines(text: str, question: str) -> list[str]:
    """The answer's lines as the terminal got them: after prompt_toolkit let the terminal go
    (bracketed paste off, once the question is accepted), before the --verbose figures."""
    assert question.split()[0] in plain(text)
    body = plain(text.rsplit("\x1b[?2004l", 1)[1]).split("total duration")[0]
    return [line.rstrip("\r") for line in body.split("\n") if line.strip()]


def prompt_count(text: str) -> int:
    match = re.search(r"prompt eval count:\s+(\d+) token", plain(text))
    assert match, plain(text)
    return int(match[1])


def test_chat_in_a_pty(smollm2_path, tmp_path):
    child = spawn(smollm2_path, tmp_path, "--verbose")
    child.expect_exact(PROMPT)
    ask(child, "/set parameter num_predict 32", SET)

    # a long answer at 40 columns: every line the program wrote fits (a line longer than
    # the terminal would be broken by it, mid-word)
    question = "Tell me a story about a dragon and a knight."
    first = ask(child, question)
    lines = answer_lines(first, question)
    assert sum(len(line.split()) for line in lines) > 10, lines
    assert all(len(line) <= 40 for line in lines), lines
    assert any(len(line) > 25 for line in lines), lines  # it did fill lines
    p1 = prompt_count(first)

    # Ctrl-C at the prompt clears the line, and the chat goes on
    child.expect_exact(PROMPT)
    child.send("half a line")
    child.sendcontrol("c")
    child.expect_exact("Use Ctrl + d or /bye to exit.")

    # Ctrl-C during an answer stops it; the earlier turn is still in the conversation
    ask(child, "/set parameter num_predict 2000", SET)
    child.sendline("Now write a very long poem about the sea, with many verses.")
    child.expect(r"\x1b\[\?2004l[^\x1b]*?\w{3}")  # the prompt let go; the answer has begun
    child.sendcontrol("c")
    child.expect_exact(PROMPT, timeout=60)
    ask(child, "/set parameter num_predict 2", SET)
    follow = ask(child, "What was the story about?")
    # the follow-up's prompt holds the first turn (its question and answer) too
    assert prompt_count(follow) > p1 + 30, (p1, plain(follow))

    # Up recalls the last message from the history
    child.expect_exact(PROMPT)
    child.send("\x1b[A")
    child.expect(r"What(?:\x1b\[C| )was the story(?:\x1b\[C| )about\?")  # (spaces drawn as moves)
    again = ask(child, "")
    assert prompt_count(again) > prompt_count(follow)  # the conversation grew by one turn

    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "What was the story about?" in (tmp_path / "history").read_text()


def test_nowordwrap_leaves_lines_to_the_terminal(smollm2_path, tmp_path):
    """The check above can fail: unwrapped, the same answer has lines wider than 40."""
    child = spawn(smollm2_path, tmp_path, "--nowordwrap", "--verbose")
    child.expect_exact(PROMPT)
    ask(child, "/set parameter num_predict 32", SET)
    question = "Tell me a story about a dragon and a knight."
    lines = answer_lines(ask(child, question), question)
    assert any(len(line) > 40 for line in lines), lines
    child.sendline("/bye")
    child.expect(pexpect.EOF)
