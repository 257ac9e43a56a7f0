"""scripts/compare_llamacpp.py's parts that need no llama.cpp build: reading llama-bench's
JSONL output (from a stand-in executable printing lines in llama-bench's own format) and
the summary arithmetic. Well under a second."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def compare():
    return load_script("compare_llamacpp")


# two lines as llama-bench -o jsonl prints them (tools/llama-bench/llama-bench.cpp,
# jsonl_printer), trimmed to a few of its fields
JSONL = [
    {
        "n_threads": 2,
        "n_prompt": 64,
        "n_gen": 0,
        "avg_ts": 312.64,
        "stddev_ts": 18.2,
        "samples_ts": [312.64],
    },
    {
        "n_threads": 2,
        "n_prompt": 0,
        "n_gen": 32,
        "avg_ts": 109.86,
        "stddev_ts": 1.6,
        "samples_ts": [109.86],
    },
]


def test_run_llama_reads_pp_and_tg_and_passes_the_flags(compare, tmp_path):
    fake = tmp_path / "llama-bench"
    lines = "\n".join(json.dumps(x) for x in JSONL)
    fake.write_text(
        f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\necho 'load: noise'\ncat <<'EOF'\n{lines}\nEOF\n"
    )
    fake.chmod(0o755)
    out = compare.run_llama(fake, Path("/m.gguf"), 64, 32, 2, 1024)
    assert out == {"pp": 312.64, "tg": 109.86}
    assert (tmp_path / "args").read_text().split() == [
        "-m",
        "/m.gguf",
        "-p",
        "64",
        "-n",
        "32",
        "-t",
        "2",
        "-d",
        "1024",
        "-r",
        "1",
        "-o",
        "jsonl",
    ]


def test_summarize_ratios_and_gb_s(compare, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x" * 10)
    tandem = [
        {
            "pp_tok_s": p,
            "tg_tok_s": t,
            "weight_bytes_per_token": 2_000_000_000,
            "kernel": "native-avx2",
        }
        for p, t in ((100, 10), (200, 30))
    ]
    llama = [{"pp": 300.0, "tg": 40.0}, {"pp": 300.0, "tg": 40.0}]
    row = compare.summarize("m", path, {"tandem": tandem, "llama": llama})
    assert row["tandem"]["pp"]["mean"] == 150 and row["tandem"]["tg"]["std"] == pytest.approx(
        14.142135, rel=1e-6
    )  # sample std of 10 and 30
    assert row["pp_ratio"] == 0.5 and row["tg_ratio"] == 0.5
    assert row["tandem_gb_s"] == 40.0 and row["llamacpp_gb_s"] == 80.0  # 2 GB × tok/s
    table = compare.format_table(
        {
            "n_prompt": 64,
            "n_gen": 32,
            "ram_gb_s": 80.0,
            "threads": 2,
            "ram_before": 80.0,
            "ram_after": 70.0,
            "models": [row],
        }
    )
    assert "| 0.50 |" in table and "| 50% |" in table
