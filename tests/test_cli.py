"""`tandem run` / `tandem pull` end to end (subprocesses on the real SmolLM2) and the
interactive Repl driven directly with in-memory streams."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import REPO

from loaders.pull import KNOWN
from runtime import LLM
from runtime.cli.main import RUN_DEFAULTS, main
from runtime.cli.repl import Repl
from runtime.sampling_params import SamplingParams


def tandem(*args: str, stdin: str | None = None, timeout: float = 300):
    # TANDEM_HOST: a port nothing listens on, so `tandem run` never meets another test's server
    env = {**os.environ, "TANDEM_HOME": os.environ["TANDEM_HOME"], "TANDEM_HOST": CLOSED}
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli.main", *args],
        cwd=REPO,
        env=env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


CLOSED = closed_port()


def no_traceback(res) -> bool:
    return "Traceback" not in res.stderr and "Traceback" not in res.stdout


# -- the command line ------------------------------------------------------------------------


def test_run_raw_greedy_verbose(smollm2_path):
    res = tandem(
        "run",
        str(smollm2_path),
        "The capital of France is",
        "--raw",
        "--temperature",
        "0",
        "--num-predict",
        "8",
        "--verbose",
    )
    assert res.returncode == 0, res.stderr
    # llama.cpp's greedy continuation begins with the token " Paris"
    assert res.stdout.startswith(" Paris"), res.stdout
    assert res.stdout.endswith("\n")
    assert re.search(r"^prompt eval rate:\s+\S+", res.stderr, re.M), res.stderr
    assert re.search(r"^eval rate:\s+\S+", res.stderr, re.M), res.stderr
    assert re.search(r"^prompt eval count:\s+5 token\(s\)$", res.stderr, re.M), res.stderr
    counts = re.findall(r"^eval count:\s+(\d+) token\(s\)$", res.stderr, re.M)
    assert counts and 1 <= int(counts[0]) <= 8
    assert no_traceback(res)


def test_run_reads_prompt_from_stdin(smollm2_path):
    res = tandem(
        "run",
        str(smollm2_path),
        "--raw",
        "--temperature",
        "0",
        "--num-predict",
        "1",
        stdin="The capital of France is",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == " Paris\n"
    assert "eval rate" not in res.stderr  # timings only with --verbose


@pytest.mark.parametrize(
    "flag, value, name",
    [("--temperature", "-1", "temperature"), ("--temperature", "nan", "temperature")],
)
def test_run_bad_flag_value(flag, value, name):
    res = tandem("run", "smollm2", "hi", flag, value)
    assert res.returncode != 0
    assert "Error:" in res.stderr and name in res.stderr, res.stderr
    assert res.stdout == ""
    assert no_traceback(res)


def test_run_flag_that_is_not_a_number():
    res = tandem("run", "smollm2", "hi", "--temperature", "hot")
    assert res.returncode == 2
    assert "--temperature" in res.stderr
    assert no_traceback(res)


def test_run_unknown_model_lists_known():
    res = tandem("run", "no-such-model", "x")
    assert res.returncode == 1
    assert res.stderr.startswith("Error:")
    assert "no-such-model" in res.stderr
    for name in KNOWN:
        assert name in res.stderr
    assert no_traceback(res)


def test_run_missing_file():
    res = tandem("run", "/nonexistent/x.gguf", "x")
    assert res.returncode == 1
    assert "Error:" in res.stderr and "/nonexistent/x.gguf" in res.stderr
    assert no_traceback(res)


def test_pull_already_pulled(smollm2_path):
    res = tandem("pull", "smollm2")
    assert res.returncode == 0, res.stderr
    assert str(smollm2_path) in res.stdout
    assert "pulling" not in res.stderr  # nothing was downloaded


def test_pull_unknown_model():
    res = tandem("pull", "no-such-model")
    assert res.returncode == 1
    assert "Error:" in res.stderr and "smollm2" in res.stderr and "gemma3" in res.stderr
    assert no_traceback(res)


def test_console_script_exists():
    exe = shutil.which("tandem")
    assert exe, "the tandem console script is not installed"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "run" in res.stdout and "pull" in res.stdout


def test_main_in_process(capsys):
    assert main(["run", "smollm2", "hi", "--temperature", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: temperature")
    assert main(["pull", "nope"]) == 1
    assert "smollm2" in capsys.readouterr().err


# -- the interactive Repl ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, num_ctx=512)


def session(repl: Repl, *lines: str) -> tuple[int, str]:
    start = repl.out.tell()
    code = repl.loop(io.StringIO("".join(line + "\n" for line in lines)))
    return code, repl.out.getvalue()[start:]


def make_repl(llm: LLM, params: SamplingParams = RUN_DEFAULTS) -> Repl:
    return Repl(llm, params, out=io.StringIO())


def test_repl_conversation(llm):
    repl = make_repl(llm)
    code, out = session(
        repl,
        "/set parameter temperature 0",
        "/set parameter num_predict 4",
        "/show parameters",
        '"""',
        "Say hi",
        'to me"""',
        "/bye",
        "this line is never read",
    )
    assert code == 0
    assert "Set parameter 'temperature' to '0'" in out
    assert "Set parameter 'num_predict' to '4'" in out
    assert repl.params.temperature == 0 and repl.params.max_tokens == 4
    # the parameters listing: every option by its Modelfile name, with its current value
    assert re.search(r"^temperature\s+0(\.0)?$", out, re.M), out
    assert re.search(r"^num_predict\s+4$", out, re.M), out
    assert re.search(r"^top_k\s+40$", out, re.M), out
    assert re.search(r"^repeat_penalty\s+1\.1$", out, re.M), out
    assert "... " in out  # continuation prompt of the multi-line message
    assert [m["role"] for m in repl.messages] == ["user", "assistant"]
    assert repl.messages[0]["content"] == "Say hi\nto me"
    answer = repl.messages[1]["content"]
    assert answer and answer in out
    assert "this line is never read" not in out

    # the conversation continues; /clear forgets it
    code, out = session(repl, "/clear", "/bye")
    assert code == 0
    assert "Cleared session context" in out
    assert repl.messages == []


def test_repl_commands_and_errors(llm):
    repl = make_repl(llm)
    repl.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    code, out = session(
        repl,
        "/set parameter bogus 1",
        "/set parameter temperature hot",
        "/set parameter stop END",
        "/set parameter seed -1",
        "/foo",
        "",
        "/show info",
        "/?",
        "/clear",
    )  # no /bye: end of input ends the loop
    assert code == 0
    errors = [line for line in out.splitlines() if "Error:" in line]
    assert len(errors) == 2, out
    assert "bogus" in errors[0]
    assert "temperature" in errors[1]
    assert repl.params.temperature == RUN_DEFAULTS.temperature  # unchanged by the bad /set
    assert repl.params.stop == ["END"]
    assert repl.params.seed is None
    assert "Unknown command '/foo'" in out
    assert re.search(r"architecture\s+llama", out) and re.search(r"layers\s+30", out), out
    assert "/set" in out and "/show" in out  # help
    assert "Cleared session context" in out
    assert repl.messages == []


def test_repl_context_error_keeps_conversation(llm):
    """A message too long for the context is reported and leaves the conversation as it was."""
    repl = make_repl(llm, SamplingParams.from_options({"num_predict": 1}, RUN_DEFAULTS))
    before = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    repl.messages = [dict(m) for m in before]
    code, out = session(repl, "hello " * 600, "/bye")
    assert code == 0
    assert "Error:" in out and "num_ctx" in out
    assert repl.messages == before


def test_repl_multiline_edge_cases(llm):
    repl = make_repl(llm)
    read = repl._read_message
    assert read(io.StringIO('"""one line"""\n')) == "one line"
    assert read(io.StringIO('"""\nfirst\n\nthird\n"""\n')) == "first\n\nthird"
    assert read(io.StringIO('"""\nunterminated\n')) == "unterminated"
    assert read(io.StringIO("")) is None
