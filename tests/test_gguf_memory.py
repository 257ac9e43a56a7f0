"""Memory ceiling (issue 13): loading any hostile GGUF — header, config with its tensor
checks, tokenizer — peaks below 256 MiB + the file's size. Before, 128 MiB of header arrays
became 1-1.6 GB of Python lists and `block_count = 2^31` grew to 13 GB. Measured in a
subprocess (tests/gguf_memory_probe.py: resident peak per file, reset between files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_models import VT, write_model
from test_gguf_hostile import gstr, kv, u32, u64

REPO = Path(__file__).resolve().parent.parent
CEILING = 256 << 20  # + the file's size


def header(kvs: list[bytes], tis: list[bytes] = (), data: bytes = b"") -> bytes:
    head = b"GGUF" + u32(3) + u64(len(tis)) + u64(len(kvs)) + b"".join(kvs) + b"".join(tis)
    return head + b"\0" * (-len(head) % 32) + data


def numeric(key: str, vtype: int, itemsize: int, n: int) -> bytes:
    return kv(key, VT.ARRAY, u32(vtype) + u64(n) + bytes(range(256)) * (n * itemsize // 256))


def strings(key: str, n: int, width: int) -> bytes:
    """n distinct-enough strings of `width` bytes (no CPython single-character caching)."""
    item = u64(width) + b"ab" * (width // 2)
    return kv(key, VT.ARRAY, u32(VT.STRING) + u64(n) + item * n)


def hostile_files(tmp: Path) -> dict[str, Path]:
    n = 1 << 24  # the per-array item cap
    files = {
        "u8-arrays-128MiB": header([numeric(f"a{i}", VT.UINT8, 1, n) for i in range(8)]),
        "i32-arrays-128MiB": header([numeric(f"a{i}", VT.INT32, 4, n) for i in range(2)]),
        "f32-array-64MiB": header([numeric("f", VT.FLOAT32, 4, n)]),
        "bool-array-16MiB": header([kv("b", VT.ARRAY, u32(VT.BOOL) + u64(n) + b"\1" * n)]),
        "string-array-8M-short": header([strings("tokenizer.ggml.tokens", 8 << 20, 2)]),
        "string-array-1M-long": header([strings("s", 1 << 20, 64)]),
        "many-keys": header([kv(f"k{i}", VT.UINT32, u32(i)) for i in range(1 << 16)]),
        "many-tensors": header(
            [],
            [gstr(f"t{i}") + u32(1) + u64(8) + u32(0) + u64(0) for i in range(1 << 16)],
            bytes(32),
        ),
        "nested-arrays": header(
            [kv("n", VT.ARRAY, u32(VT.ARRAY) + u64(4096) + (u32(VT.UINT8) + u64(0)) * 4096)]
        ),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp / f"{name}.gguf"
        paths[name].write_bytes(data)
    paths["block-count-2^31"] = write_model(
        tmp / "blocks.gguf", {"llama.block_count": (2**31, VT.UINT32)}
    )
    paths["block-count-u64"] = write_model(
        tmp / "blocks64.gguf", {"llama.block_count": (2**64 - 1, VT.UINT64)}
    )
    return paths


def probe(paths: list[Path]) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "gguf_memory_probe.py"), *map(str, paths)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_hostile_gguf_load_peaks_below_ceiling(tmp_path: Path) -> None:
    paths = hostile_files(tmp_path)
    results = dict(zip(paths, probe(list(paths.values())), strict=True))
    report = {
        name: f"{r['peak'] / 2**20:.0f} MiB for {r['size'] / 2**20:.0f} MiB"
        for name, r in results.items()
    }
    for name, r in results.items():
        assert r["peak"] < CEILING + r["size"], (name, report)
        # the errors are the typed ones (no architecture, or the block count)
        assert r["error"] and r["error"].split(":")[0] in ("UnsupportedError", "GGUFError"), r
    assert "block_count' is 2147483648" in results["block-count-2^31"]["error"]
    # compact, not merely under the ceiling: numeric arrays cost their bytes (plus the mapping)
    u8 = results["u8-arrays-128MiB"]
    assert u8["peak"] < 2.2 * u8["size"]  # the mapped file + one copy
    print(report)
