"""Metadata-only GGUFs at real MoE sizes (make_synthetic_gguf.py --arch A --size S
--metadata-only: header and tensor table, the weights a hole) parse as the real files and
`tandem plan` on them puts the routed experts of the last layers on the CPU on a small GPU."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from runtime.cli.main import main


@pytest.mark.parametrize(
    ("arch", "size", "gigabytes", "experts"),
    [("qwen3moe", "30b-a3b", 18.55, 128), ("gpt-oss", "20b", 12.10, 32)],
)
def test_metadata_only_file_plans_the_moe_split(tmp_path, capsys, arch, size, gigabytes, experts):
    make = load_script("make_synthetic_gguf")
    out = tmp_path / f"{arch}.gguf"
    make.main(["--arch", arch, "--size", size, "--metadata-only", "--out", str(out)])
    assert out.stat().st_size / 1e9 == pytest.approx(gigabytes, abs=0.01)
    assert out.stat().st_blocks * 512 < 10 << 20  # a hole: no weight bytes on disk
    with GGUFFile(out) as gguf:
        config = ModelConfig.from_metadata(gguf.metadata, gguf.tensors)
    assert config.n_expert == experts
    capsys.readouterr()
    flags = ["--gpu-memory", "8GB", "--ram", "64GB", "--ram-bandwidth", "60", "--json"]
    assert main(["plan", str(out), *flags]) == 0
    report = json.loads(capsys.readouterr().out)
    layers = report["layers"]
    assert all(row["attn"] == "gpu" for row in layers)
    assert layers[-1]["experts"] == "cpu"
    cmp = report["moe_vs_layer_split"]
    assert cmp["moe_split"]["decode_tokens_per_s"] > cmp["layer_split"]["decode_tokens_per_s"]
