"""`tandem bench` (runtime/cli/bench.py) and the synthetic-model generator
(scripts/make_synthetic_gguf.py), on a tiny synthetic file (2 layers, dim 64) written with
SmolLM2's tokenizer; about 15 s on a quiet 2-core machine, most of it parsing SmolLM2's
vocabulary once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from gguf import GGMLQuantizationType as T
from reference_model import KVCache, forward

from loaders.gguf_file import GGUFFile
from quant.dequant import dequantize
from quant.errors import InvalidParameterError
from runtime.cli.bench import (
    Bench,
    BenchSpec,
    format_table,
    mean_std,
    run_bench,
    weight_bytes_per_token,
)
from runtime.cli.main import main
from runtime.loaded_model import LoadedModel

TINY = ["--layers", "2", "--dim", "64", "--ffn", "128", "--heads", "4", "--kv-heads", "2"]


@pytest.fixture(scope="module")
def synth():
    return load_script("make_synthetic_gguf")


@pytest.fixture(scope="module")
def tiny_path(synth, smollm2_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "tiny-q4_0.gguf"
    synth.main([*TINY, "--type", "q4_0", "--out", str(out), "--tokenizer-from", str(smollm2_path)])
    return out


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_synthetic_file_has_the_asked_shapes_and_the_source_tokenizer(tiny_path, smollm2_path):
    made, source = GGUFFile(tiny_path), GGUFFile(smollm2_path)
    vocab = len(source.metadata["tokenizer.ggml.tokens"])  # 49152
    t = made.tensors
    assert len(t) == 2 * 9 + 3
    assert t["token_embd.weight"].shape == (64, vocab) and t["output.weight"].shape == (64, vocab)
    assert t["blk.1.attn_k.weight"].shape == (64, 32)  # 2 KV heads of 16
    assert t["blk.0.ffn_down.weight"].shape == (128, 64)
    assert {i.ggml_type for i in t.values() if len(i.shape) == 2} == {int(T.Q4_0)}
    assert {i.ggml_type for i in t.values() if len(i.shape) == 1} == {int(T.F32)}
    for key, value in source.metadata.items():
        if key.startswith("tokenizer."):
            assert made.metadata[key] == value, key
            assert made.metadata_types[key] == source.metadata_types[key], key
    assert made.metadata["llama.block_count"] == 2 and made.metadata["llama.vocab_size"] == vocab


def test_synthetic_model_loads_tokenizes_and_runs(tiny_path, smollm2_path):
    lm = LoadedModel.load(tiny_path)
    assert lm.config.n_layer == 2 and lm.config.n_head_kv == 2 and not lm.config.tied_head
    text = "The history of the printing press"
    assert lm.tokenizer.encode(text) == LoadedModel.load(smollm2_path).tokenizer.encode(text)
    with torch.inference_mode():
        logits = forward(lm.model, torch.tensor([1, 500, 7000]), 0, KVCache(lm.config, 8))
    assert logits.shape == (1, lm.config.vocab_size) and torch.isfinite(logits).all()


def test_q8_0_weights_are_quantized_gaussians(synth):
    # dequantized Q8_0 differs from the Gaussian by at most d/2 per element: its std is
    # 0.02 to within sampling error (65536 samples: ~0.3%) plus that rounding (< 0.1%)
    w = dequantize(torch.from_numpy(synth.random_matrix(256, 256, T.Q8_0, seed=3)), int(T.Q8_0))
    assert w.std().item() == pytest.approx(synth.WEIGHT_STD, rel=0.02)
    assert abs(w.mean().item()) < 0.001


def test_q4_k_random_blocks_are_finite_centred_and_near_the_target_spread(synth):
    blocks = synth.random_blocks(T.Q4_K, 512, np.random.default_rng(0))  # (512, 144) uint8
    target_d = synth.WEIGHT_STD / synth.unit_std(T.Q4_K)
    w = dequantize(torch.from_numpy(blocks), int(T.Q4_K)).flatten()  # 131072 weights
    assert torch.isfinite(w).all()
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32))
    assert d.min() >= 0.75 * target_d * 0.999 and d.max() <= 1.25 * target_d * 1.001
    # std of d·sc·q is 0.02 by construction; the per-sub-block min offsets add spread
    # (the docstring's figures give std ≈ 0.024), the random d ±25% a little more
    assert 0.018 < w.std().item() < 0.03
    assert abs(w.mean().item()) < 0.002  # dmin = 7.5·d cancels the mean of d·sc·q


def test_shape_overrides_that_cannot_form_a_model_are_refused(synth, tmp_path):
    with pytest.raises(SystemExit, match="multiples of 256"):
        synth.main([*TINY, "--type", "q4_k", "--out", str(tmp_path / "x.gguf")])
    with pytest.raises(SystemExit, match="multiple of kv-heads"):
        synth.main(
            [
                "--layers",
                "1",
                "--dim",
                "64",
                "--ffn",
                "64",
                "--heads",
                "4",
                "--kv-heads",
                "3",
                "--out",
                str(tmp_path / "x.gguf"),
            ]
        )
    assert not (tmp_path / "x.gguf").exists()


def test_weight_bytes_per_token_counts_blocks_head_and_one_embedding_row(tiny_path):
    info = GGUFFile(tiny_path).tensors
    blocks = sum(i.nbytes for n, i in info.items() if n.startswith("blk.") and len(i.shape) == 2)
    expected = blocks + info["output.weight"].nbytes + info["token_embd.weight"].row_bytes
    assert weight_bytes_per_token(LoadedModel.load(tiny_path)) == expected


def test_weight_bytes_per_token_counts_the_active_experts_only(synth, smollm2_path, tmp_path):
    """A MoE token reads experts_used / experts of each routed expert tensor (4 of 16 here),
    all of the attention and the router."""
    out = tmp_path / "moe.gguf"
    synth.main(["--arch", "qwen3moe", "--out", str(out), "--vocab", str(smollm2_path)])
    info = GGUFFile(out).tensors
    dense = sum(
        i.nbytes
        for n, i in info.items()
        if n.startswith("blk.") and len(i.shape) == 2 and "_exps" not in n
    )
    experts = sum(i.nbytes for n, i in info.items() if "_exps" in n)
    expected = dense + experts * 4 // 16 + info["output.weight"].nbytes
    expected += info["token_embd.weight"].row_bytes
    assert weight_bytes_per_token(LoadedModel.load(out)) == expected


def test_weight_bytes_per_token_reads_the_whole_tied_embedding(smollm2_path):
    info = GGUFFile(smollm2_path).tensors
    assert "output.weight" not in info
    blocks = sum(i.nbytes for n, i in info.items() if n.startswith("blk.") and len(i.shape) == 2)
    expected = blocks + info["token_embd.weight"].nbytes
    assert weight_bytes_per_token(LoadedModel.load(smollm2_path)) == expected


def test_bench_measures_both_tests_and_sets_threads(tiny_path, restore_threads):
    r = run_bench(BenchSpec(str(tiny_path), n_prompt=8, n_gen=4, threads=1, repetitions=2))
    assert torch.get_num_threads() == 1 and r.threads == 1
    assert len(r.pp_samples) == len(r.tg_samples) == 2
    assert all(s > 0 and math.isfinite(s) for s in r.pp_samples + r.tg_samples)
    assert r.pp_tok_s == pytest.approx(sum(r.pp_samples) / 2)
    assert r.weights_gb_s == pytest.approx(r.weight_bytes_per_token * r.tg_tok_s / 1e9)
    assert r.file_bytes == tiny_path.stat().st_size
    table = format_table(r)
    assert "| pp8 |" in table and "| tg4 |" in table


def test_generation_feeds_back_its_own_greedy_tokens(tiny_path):
    lm = LoadedModel.load(tiny_path)
    bench = Bench(lm, BenchSpec(str(tiny_path), n_prompt=0, n_gen=3))
    fed = []
    run = bench.runner.run

    def spy(batch):  # the engine's path: one sequence's rows into the paged pool
        fed.append((batch.tokens.tolist(), int(batch.positions[0])))
        return run(batch)

    bench.runner.run = spy
    bench.time_generation(3)
    assert [start for _, start in fed] == [0, 1, 2] and fed[0][0] == [lm.tokenizer.bos_id]
    with torch.inference_mode():  # the second token is the argmax after BOS
        first = forward(lm.model, torch.tensor([lm.tokenizer.bos_id]), 0, KVCache(lm.config, 16))
    assert fed[1][0] == [int(first[-1].argmax())]


def test_depth_starts_both_tests_from_a_filled_cache(tiny_path, restore_threads):
    """-d N (llama-bench's depth): N tokens are prefilled untimed, in chunks of 512, and both
    tests run at positions N, N + 1, …; the table names the tests "pp4 @ d600"."""
    lm = LoadedModel.load(tiny_path)
    bench = Bench(lm, BenchSpec(str(tiny_path), n_prompt=4, n_gen=3, n_depth=600))
    assert bench.n_ctx == 608  # max(4, 3) + 600, in whole 16-token pages
    calls = []
    run = bench.runner.run

    def spy(batch):
        calls.append((batch.tokens.shape[0], int(batch.positions[0])))
        return run(batch)

    bench.runner.run = spy
    bench.time_generation(3)
    assert calls == [(512, 0), (88, 512), (1, 600), (1, 601), (1, 602)]
    calls.clear()
    bench.time_prompt(4)
    assert calls == [(512, 0), (88, 512), (4, 600)]
    r = Bench(lm, BenchSpec(str(tiny_path), n_prompt=4, n_gen=3, n_depth=600, repetitions=1)).run()
    assert r.n_depth == 600 and r.pp_tok_s > 0 and r.tg_tok_s > 0
    table = format_table(r)
    assert "| pp4 @ d600 |" in table and "| tg3 @ d600 |" in table


def test_cli_json_and_skipped_test(tiny_path, capsys, restore_threads):
    assert (
        main(["bench", str(tiny_path), "-p", "0", "-n", "2", "-r", "1", "-t", "1", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["pp_tok_s"] is None and out["tg_tok_s"] > 0 and out["weights_gb_s"] > 0
    assert (out["n_prompt"], out["n_gen"], out["threads"]) == (0, 2, 1)
    assert (out["placement"], out["gpu_layers"], out["cuda_graphs"]) == ("100% CPU", 0, False)


def test_num_gpu_places_layers_before_measuring(tiny_path, monkeypatch, restore_threads):
    """--num-gpu N loads through the planner with num_gpu N (without CUDA: all on the CPU,
    with a warning); the result says where the layers ran."""
    import runtime.cli.bench as bench_module

    asked = []
    real = bench_module.auto_placement

    def spy(**kw):
        asked.append(kw)
        return real(**kw)

    monkeypatch.setattr(bench_module, "auto_placement", spy)
    assert (
        main(["bench", str(tiny_path), "-p", "0", "-n", "2", "-r", "1", "--num-gpu", "0", "--json"])
        == 0
    )
    assert asked == [{"num_ctx": 16, "num_gpu": 0}]


@pytest.mark.parametrize(
    "flags, fields, words",
    [
        (["-p", "-1"], {"n_prompt": -1}, "0 or more"),
        (["-d", "-5"], {"n_depth": -5}, "0 or more"),
        (["-p", "0", "-n", "0"], {"n_prompt": 0, "n_gen": 0}, "nothing to measure"),
        (["-t", "0"], {"threads": 0}, "--threads"),
        (["-r", "0"], {"repetitions": 0}, "--repetitions"),
        (["--num-gpu", "-2"], {"num_gpu": -2}, "--num-gpu"),
    ],
)
def test_bad_flags_are_refused_before_loading(flags, fields, words, capsys):
    with pytest.raises(InvalidParameterError, match=words):
        BenchSpec("m", **fields).validate()
    # the model does not exist: the flag's message (not "no model") shows it was checked first
    assert main(["bench", "no-such-model", *flags]) == 1
    assert words in capsys.readouterr().err


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


@pytest.fixture(scope="module")
def sweep_script():
    return load_script("sweep_gpu")


def test_sweep_points(sweep_script):
    """Without a GPU only the all-CPU point; with one, steps of ~1/8 of the layers, every
    layer, and the auto plan (always added)."""
    sweep = sweep_script
    assert sweep.default_points(30, has_gpu=False) == [0]
    assert sweep.default_points(30, has_gpu=True) == [0, 4, 8, 12, 16, 20, 24, 28, 30, -1]
    assert sweep.parse_points("0,8,all", 22, has_gpu=True) == [0, 8, 22, -1]
    assert sweep.parse_points("0", 22, has_gpu=False) == [0]


def test_sweep_measures_and_predicts_the_cpu_point(
    sweep_script, tiny_path, tmp_path, capsys, restore_threads
):
    out = tmp_path / "sweep.json"
    assert (
        sweep_script.main(
            [
                str(tiny_path),
                "--points",
                "0",
                "-p",
                "8",
                "-n",
                "4",
                "-r",
                "1",
                "-t",
                "1",
                "--json-out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    (point,) = report["points"]
    assert point["num_gpu"] == 0 and point["placement"] == "100% CPU"
    assert point["tg_measured"] > 0 and point["tg_predicted"] > 0
    assert point["tg_error"] == pytest.approx(point["tg_predicted"] / point["tg_measured"] - 1)
    assert report["auto_share_of_best"] is None  # no auto point without a GPU
    assert "| 0 | 100% CPU | cpu | no |" in capsys.readouterr().out
