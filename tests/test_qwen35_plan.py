"""Metadata-only GGUFs at the released Qwen3.5 sizes (make_synthetic_gguf.py --arch qwen35
--size 0.8b|2b|4b|9b|27b, --arch qwen35moe --size 35b-a3b --metadata-only) parse as the real
files, and `tandem plan` on them counts KV for the attention layers only (one in four) and a
fixed recurrent state per sequence for the delta nets, as computed here by hand."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from runtime.cli.main import main

CTX, PARALLEL = 8192, 16
SLOTS = CTX * PARALLEL  # 8192 is whole 16-token blocks

# Per size, by hand from the shapes (scripts/synthetic_archs/qwen35.py):
#   KV per token = attention layers (layers / 4) × KV heads × (256 + 256) × 2 bytes (f16)
#   state per delta-net layer = 4 bytes × (conv window 3 × (2 × 16 × 128 + V × 128)
#                                          + V heads × 128 × 128), V = linear v heads
#   0.8b, 2b: 6 attention × 2 KV heads → 12 288 B; V 16: 4 × (3 × 6144 + 262 144)
#             = 1 122 304 B × 18 layers = 20 201 472 B per sequence
#   4b, 9b:   8 × 4 → 32 768 B; V 32: 4 × (3 × 8192 + 524 288) = 2 195 456 B × 24 = 52 690 944
#   27b:      16 × 4 → 65 536 B; V 48: 4 × (3 × 10 240 + 786 432) = 3 268 608 B × 48
#             = 156 893 184
#   35b-a3b:  10 × 2 → 20 480 B; V 32: 2 195 456 B × 30 = 65 863 680
SIZES = [
    # arch, size, layers, attention layers, KV bytes per token, state bytes per sequence
    ("qwen35", "0.8b", 24, 6, 12288, 20201472),
    ("qwen35", "2b", 24, 6, 12288, 20201472),
    ("qwen35", "4b", 32, 8, 32768, 52690944),
    ("qwen35", "9b", 32, 8, 32768, 52690944),
    ("qwen35", "27b", 64, 16, 65536, 156893184),
    ("qwen35moe", "35b-a3b", 40, 10, 20480, 65863680),
]


@pytest.mark.parametrize(("arch", "size", "layers", "attention", "per_token", "per_seq"), SIZES)
def test_plan_counts_kv_for_attention_and_a_fixed_state(
    tmp_path, capsys, arch, size, layers, attention, per_token, per_seq
):
    make = load_script("make_synthetic_gguf")
    out = tmp_path / f"{arch}-{size}.gguf"
    make.main(["--arch", arch, "--size", size, "--metadata-only", "--out", str(out)])
    assert out.stat().st_blocks * 512 < 10 << 20  # a hole: no weight bytes on disk
    with GGUFFile(out) as gguf:
        config = ModelConfig.from_metadata(gguf.metadata, gguf.tensors)
    assert (config.n_layer, config.n_layer - sum(config.recurrent_layers)) == (layers, attention)
    capsys.readouterr()
    flags = ["--num-ctx", str(CTX), "--parallel", str(PARALLEL), "--ram", "256GB"]
    assert main(["plan", str(out), *flags, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    k = report["kv_state"]
    assert (k["attention_layers"], k["recurrent_layers"]) == (attention, layers - attention)
    assert k["kv_bytes_per_token"] == per_token
    assert k["kv_bytes"] == per_token * SLOTS
    assert k["state_bytes_per_sequence"] == per_seq
    assert k["state_bytes"] == per_seq * PARALLEL
    # the memory table's KV column is both together, all on the CPU here
    assert report["memory"]["cpu"]["kv"] == per_token * SLOTS + per_seq * PARALLEL
    # the state does not grow with the context; the KV does, linearly
    longer_flags = ["--num-ctx", str(4 * CTX), "--parallel", str(PARALLEL), "--ram", "1TB"]
    assert main(["plan", str(out), *longer_flags, "--json"]) == 0
    longer = json.loads(capsys.readouterr().out)["kv_state"]
    assert longer["state_bytes"] == k["state_bytes"]
    assert longer["kv_bytes"] == 4 * k["kv_bytes"]
    assert main(["plan", str(out), *flags]) == 0
    text = capsys.readouterr().out
    assert f"KV: {attention} attention layers" in text
    assert f"recurrent state: {layers - attention} delta-net layers" in text


def test_plan_leaves_the_mtp_block_out(tmp_path, capsys):
    make = load_script("make_synthetic_gguf")
    plain, mtp = tmp_path / "plain.gguf", tmp_path / "mtp.gguf"
    make.main(["--arch", "qwen35", "--size", "0.8b", "--metadata-only", "--out", str(plain)])
    make.main(
        ["--arch", "qwen35", "--size", "0.8b", "--metadata-only", "--mtp", "1"]
        + ["--out", str(mtp)]
    )
    reports = []
    for path in (plain, mtp):
        capsys.readouterr()
        assert main(["plan", str(path), "--ram", "64GB", "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[1]["weight_bytes"] == reports[0]["weight_bytes"]
    assert reports[1]["memory"] == reports[0]["memory"]
    assert reports[1]["n_layer"] == 24
    with GGUFFile(mtp) as gguf:
        block = sum(t.nbytes for n, t in gguf.tensors.items() if n.startswith("blk.24."))
    assert reports[1]["kv_state"]["nextn_bytes_unloaded"] == block > 0
