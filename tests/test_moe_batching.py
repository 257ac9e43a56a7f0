"""Continuous batching with mixture-of-experts layers: 16 decodes in one step read each chosen
expert's weights once (the stream counter of kernels/experts.py, counted in the kernel path),
and each sequence's logits equal those it gets alone."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T
from moe_reference import LAYERS, make_weights, write_gguf
from reference_model import KVCache, forward

from kernels import native_loader
from kernels.experts import expert_stats
from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from runtime.execution.model_runner import ModelRunner
from runtime.kv.forward_batch import ForwardBatch
from runtime.models import build_model

pytestmark = pytest.mark.skipif(
    not native_loader.available(), reason="the native CPU kernel is not built here"
)
N_SEQ, PROMPT, DECODES = 16, 5, 3


def test_sixteen_decodes_read_each_chosen_expert_once_per_step(tmp_path):
    write_gguf(tmp_path / "m.gguf", "qwen3moe", make_weights("qwen3moe", 2), T.Q8_0)
    gguf_file = GGUFFile(tmp_path / "m.gguf")
    model = build_model(gguf_file, ModelConfig.from_metadata(gguf_file.metadata, gguf_file.tensors))
    routed: list[torch.Tensor] = []  # the expert ids each layer chose this step
    for layer in model.layers:
        moe, route = layer.moe, layer.moe.route

        def record(h, route=route):
            weights, ids = route(h)
            routed.append(ids)
            return weights, ids

        moe.route = record
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50, (PROMPT + DECODES,), generator=g).tolist() for _ in range(N_SEQ)]
    runner = ModelRunner(model, N_SEQ)
    fused = all(layer.moe.gate.panels is not None for layer in model.layers)
    got = []
    with torch.inference_mode():
        for step in range(DECODES + 1):
            n = PROMPT if step == 0 else 1
            at = 0 if step == 0 else PROMPT + step - 1
            batch = ForwardBatch.build(
                [(s[at : at + n], at, [b], True) for b, s in enumerate(seqs)]
            )
            routed.clear()
            expert_stats(reset=True)
            got.append(runner.run(batch))
            stats = expert_stats(reset=True)
            chosen = [int(torch.unique(ids).numel()) for ids in routed]
            assert len(chosen) == LAYERS
            # per layer: one call of the fused feed-forward on panels (else one gate+up call
            # and one down call); each chosen expert streamed once by each of its three
            # weights, however many of the 16 sequences chose it
            assert stats["calls"] == (1 if fused else 2) * LAYERS
            assert stats["streams"] == 3 * sum(chosen)
            rows = sum(ids.numel() for ids in routed)  # (token, expert) pairs
            assert stats["streams"] < 3 * rows  # experts shared across the batch: fewer reads
    for b, s in enumerate(seqs):
        with torch.inference_mode():
            alone = forward(model, torch.tensor(s), 0, KVCache(model.config, 32), all_logits=True)
        for step in range(DECODES + 1):
            pos = PROMPT - 1 + step
            # f16 pages either way; the router's torch matmul sums in another order for 80
            # rows than for 8 (measured: at most 0.13% of the largest logit)
            row, ref = got[step][b], alone[pos]
            assert (row - ref).abs().max().item() < 5e-3 * ref.abs().max().item()
            assert row.argmax() == ref.argmax()
