"""What `tandem run` says while it works (issue 17 part 2): the kernel build and a wait for
another process's build are announced, a spinner only on a terminal, the CUDA-torch
warning, the startup line, --verbose totals that include the load; and the word wrap."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import threading
import time

import pytest

from runtime.cli.feedback import cuda_warning, placement_summary, spinner
from runtime.cli.wordwrap import WordWrap


def test_a_wait_for_another_build_is_announced(tmp_path, caplog):
    from kernels import native_loader

    with open(tmp_path / "tandem.flock", "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # another process is building
        entered = threading.Event()

        def build():
            with native_loader._build_lock(str(tmp_path)):
                entered.set()

        with caplog.at_level(logging.INFO, logger="kernels.native_loader"):
            thread = threading.Thread(target=build)
            thread.start()
            deadline = time.time() + 10
            while "waiting for another process" not in caplog.text and time.time() < deadline:
                time.sleep(0.05)
            assert "waiting for another process" in caplog.text
            assert not entered.is_set()
            fcntl.flock(other, fcntl.LOCK_UN)
            thread.join(10)
    assert entered.is_set()


def test_a_build_is_announced_when_a_source_is_newer_than_the_library(tmp_path):
    from kernels import native_loader

    so = tmp_path / "k.so"
    assert native_loader._stale(so)  # none yet
    so.write_bytes(b"")
    newest = max(p.stat().st_mtime for p in native_loader.SOURCES + native_loader.HEADERS)
    os.utime(so, (newest - 10, newest - 10))
    assert native_loader._stale(so)  # a source changed since: ninja rebuilds
    os.utime(so, (newest + 10, newest + 10))
    assert not native_loader._stale(so)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_spinner_only_on_a_terminal():
    plain = io.StringIO()
    with spinner("loading x", plain):
        time.sleep(0.15)
    assert plain.getvalue() == ""
    tty = Tty()
    with spinner("loading x", tty):
        time.sleep(0.25)
    text = tty.getvalue()
    assert "loading x" in text and text.endswith("\r\x1b[K")  # erased at the end


def test_cuda_warning_names_the_fix_when_torch_cannot_see_the_gpu():
    import torch

    if torch.cuda.is_available():
        assert cuda_warning(present=True) is None
        return
    text = cuda_warning(present=True)
    assert text is not None
    assert "download.pytorch.org/whl/cu" in text and "tandem[gpu]" in text
    assert torch.__version__ in text
    assert cuda_warning(present=False) is None


class Map:
    def __init__(self, layers, head):
        self.layers, self.head = layers, head


def test_placement_summary():
    assert placement_summary(Map(("cpu",) * 4, "cpu"), 4) == "CPU only"
    assert placement_summary(Map(("cpu", "gpu", "gpu", "gpu"), "gpu"), 4) == (
        "3/4 layers on GPU, head on GPU"
    )


TEXT = (
    "The quick brown fox jumps over the lazy dog while an extraordinarily "
    "long-winded narrator explains everything.\nA new paragraph starts here and goes on."
)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_wordwrap_never_breaks_a_word_at_40_columns(chunk):
    out = io.StringIO()
    wrap = WordWrap(out, 40)
    for i in range(0, len(TEXT), chunk):  # as tokens arrive
        wrap.write(TEXT[i : i + chunk])
    wrap.finish()
    lines = out.getvalue().split("\n")
    assert all(len(line) <= 40 for line in lines), lines
    assert out.getvalue().split() == TEXT.split()  # every word whole, in order


def test_verbose_total_includes_the_load(smollm2_path, capsys):
    from runtime import LLM
    from runtime.cli.repl import Repl
    from runtime.sampling_params import OLLAMA_DEFAULTS, SamplingParams

    llm = LLM(smollm2_path, num_ctx=256)
    params = SamplingParams.from_options({"num_predict": 2, "temperature": 0}, OLLAMA_DEFAULTS)
    repl = Repl(llm, params, verbose=True, out=io.StringIO())
    repl.answer("hi")
    first = capsys.readouterr().err
    repl.answer("again")
    second = capsys.readouterr().err

    def figure(text: str, name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name))
        return float(line.split()[-1].rstrip("s"))

    load = figure(first, "load duration")
    assert load == pytest.approx(llm.lm.load_seconds, abs=1e-3) and load > 0
    assert figure(first, "total duration") >= load
    assert figure(second, "load duration") == 0.0  # loaded once, counted once
    assert figure(second, "total duration") >= figure(second, "prompt eval duration")
