"""A GGUF truncated under a running process (issue 13: SIGBUS killed the server). After
`GGUFFile.detach()` every tensor view handed out reads memory of its own; LoadedModel.load
detaches once the model is built, so generation survives the file being cut to 4 KiB.
Truncation runs in subprocesses: a SIGBUS there fails the test instead of killing pytest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from loaders.gguf_file import GGUFFile
from quant.errors import GGUFError

REPO = Path(__file__).resolve().parent.parent
N_A, N_B = 300_000, 500_000  # float32 elements: several pages each


def write_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(0)
    a, b = g.standard_normal(N_A).astype(np.float32), g.standard_normal(N_B).astype(np.float32)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("a", a)
    w.add_tensor("b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return a, b


def run_script(body: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


TRUNCATE_AND_READ = """
    import os, sys, numpy as np
    sys.path.insert(0, "tests")
    from test_gguf_detach import write_file
    from loaders.gguf_file import GGUFFile
    from quant.errors import GGUFError
    path = sys.argv[1] if len(sys.argv) > 1 else {path!r}
    a, b = write_file(path)
    f = GGUFFile(path)
    view_a, view_b = f.tensor("a"), f.tensor_bytes("b")
    if {detach}:
        f.detach()
    os.truncate(path, 64)
    print("truncated", flush=True)
    assert np.array_equal(view_a.numpy().view(np.float32).reshape(-1), a)  # SIGBUS if mapped
    assert np.array_equal(view_b.numpy().view(np.float32), b)
    assert np.array_equal(f.tensor("a").numpy().view(np.float32).reshape(-1), a)
    print("read", flush=True)
"""


def test_detached_views_survive_truncation(tmp_path: Path) -> None:
    out = run_script(TRUNCATE_AND_READ.format(path=str(tmp_path / "m.gguf"), detach=True))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["truncated", "read"]


def test_without_detach_truncation_is_a_sigbus(tmp_path: Path) -> None:
    """The control: the same script without detach() dies as the server did."""
    out = run_script(TRUNCATE_AND_READ.format(path=str(tmp_path / "m.gguf"), detach=False))
    assert out.returncode == -signal.SIGBUS, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split() == ["truncated"]


def test_detach_keeps_every_byte_and_rereads_released_tensors(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    a, b = write_file(path)
    f = GGUFFile(path)
    view_a, view_b = f.tensor("a"), f.tensor("b")
    row = view_a[0, :16].clone()
    f.release_pages("b")  # as Model does once b's panels exist
    f.detach()
    f.detach()  # idempotent
    assert f.detached
    assert torch.equal(view_a[0, :16], row)
    assert np.array_equal(view_a.numpy().view(np.float32).reshape(-1), a)
    assert np.array_equal(f.tensor("b").numpy().view(np.float32).reshape(-1), b)  # from file
    assert not np.array_equal(view_b.numpy().view(np.float32).reshape(-1), b)  # pages dropped
    own = f.tensor("a", copy=True)
    own[0, 0] = own[0, 0] ^ 0xFF  # writable, and not the mapping
    assert not torch.equal(own, view_a) and torch.equal(view_a[0, :16], row)
    path.write_bytes(path.read_bytes())  # same bytes, but a new file (mtime)
    os.utime(path, ns=(1, 1))
    with pytest.raises(GGUFError, match="changed since it was loaded"):
        f.tensor("b")
    assert np.array_equal(f.tensor("a").numpy().view(np.float32).reshape(-1), a)


def test_detach_keeps_only_what_views_may_read(tmp_path: Path) -> None:
    """Tensors never handed out are not copied; read later, they come from the file."""
    path = tmp_path / "m.gguf"
    a, b = write_file(path)
    f = GGUFFile(path)
    view_a = f.tensor("a")
    f.detach()
    got = f.tensor("b")  # never handed out before detach: read afresh, own memory
    assert np.array_equal(got.numpy().view(np.float32).reshape(-1), b) and got.is_contiguous()
    got[0, 0] = 1  # writable: not the read-only mapping
    assert np.array_equal(f.tensor("b").numpy().view(np.float32).reshape(-1), b)
    os.truncate(path, 64)
    with pytest.raises(GGUFError, match=r"changed since it was loaded \(size \d+ → 64\)"):
        f.tensor("b")
    assert np.array_equal(view_a.numpy().view(np.float32).reshape(-1), a)
    assert np.array_equal(f.tensor("a").numpy().view(np.float32).reshape(-1), a)


def test_copy_before_detach_is_own_memory(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    a, _ = write_file(path)
    with GGUFFile(path) as f:
        own = f.tensor_bytes("a", copy=True)
        view = f.tensor_bytes("a")
        assert own.data_ptr() != view.data_ptr() and torch.equal(own, view)
        own[:4] = 0
        assert np.array_equal(view.numpy().view(np.float32), a)


def test_served_model_survives_its_file_truncated(smollm2_path: Path, tmp_path: Path) -> None:
    """End to end: load a copy of SmolLM2 by path, cut the file to 4 KiB, generate again."""
    copy = tmp_path / "smollm2-copy.gguf"
    shutil.copyfile(smollm2_path, copy)
    out = run_script(
        f"""
        import json, os
        from runtime.llm import LLM
        from runtime.sampling_params import SamplingParams
        llm = LLM({str(copy)!r}, num_ctx=256)
        params = SamplingParams(max_tokens=4, temperature=0)
        first = llm.generate("The capital of France is", params)[0].outputs[0].token_ids
        os.truncate({str(copy)!r}, 4096)
        again = llm.generate("The capital of France is", params)[0].outputs[0].token_ids
        other = llm.generate("Once upon a time", params)[0].outputs[0].token_ids
        print(json.dumps([first, again, other]))
        """,
        timeout=600,
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    first, again, other = json.loads(out.stdout.splitlines()[-1])
    assert len(first) == 4 and again == first and len(other) == 4
