"""DecodeGraphs (runtime/execution/decode_graph.py) on a tiny synthetic llama whose blocks and head are
all on the "GPU" (Triton's kernels, in its interpreter here, on quantized Q8_0/Q4_0 linears):
decode steps through the static, padded buffers give the logits the eager step gives,
step after step (so padding rows write no KV), at batch sizes that pad (3 → 4, 5 → 6) and
that do not. Steps the graphs do not take are handed back. The capture itself needs CUDA:
test_graph_replay_on_cuda (gpu marker) checks it on the same model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from runtime.execution.decode_graph import DecodeGraphs, buckets, unsupported
from runtime.execution.model_runner import ModelRunner
from runtime.kv.forward_batch import ForwardBatch
from runtime.kv.kv_pool import KVPool
from runtime.models import Model, build_model
from runtime.placement.device_map import DeviceMap

E, H, HKV, D, FF, V, LAYERS = 64, 2, 1, 32, 96, 70, 2
PAGE, TABLE = 16, 4  # blocks per sequence here


def write_tiny(path) -> None:
    g = np.random.default_rng(0)

    def rnd(*shape, scale=0.2):
        return (g.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (
        ("block_count", LAYERS),
        ("context_length", 256),
        ("embedding_length", E),
        ("feed_forward_length", FF),
        ("attention.head_count", H),
        ("attention.head_count_kv", HKV),
    ):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(V)
    tensors = {
        "token_embd.weight": (rnd(V, E, scale=1.0), QT.Q8_0),
        "output_norm.weight": (1 + rnd(E), QT.F32),
        "output.weight": (rnd(V, E), QT.Q4_0),
    }
    for i in range(LAYERS):
        p = f"blk.{i}."
        tensors |= {
            p + "attn_norm.weight": (1 + rnd(E), QT.F32),
            p + "ffn_norm.weight": (1 + rnd(E), QT.F32),
            p + "attn_q.weight": (rnd(H * D, E), QT.Q8_0),
            p + "attn_k.weight": (rnd(HKV * D, E), QT.Q8_0),
            p + "attn_v.weight": (rnd(HKV * D, E), QT.Q4_0),
            p + "attn_output.weight": (rnd(E, H * D), QT.Q8_0),
            p + "ffn_gate.weight": (rnd(FF, E), QT.Q4_0),
            p + "ffn_up.weight": (rnd(FF, E), QT.Q8_0),
            p + "ffn_down.weight": (rnd(E, FF), QT.Q8_0),
        }
    for name, (array, qtype) in tensors.items():
        if qtype == QT.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "tiny.gguf"
    write_tiny(path)
    return GGUFFile(path)


@pytest.fixture(scope="module")
def on_gpu(gguf_file):
    """The tiny model with every block and the head on the "GPU"."""
    pytest.importorskip("kernels.triton")  # sets TRITON_INTERPRET before triton loads
    config = ModelConfig.from_metadata(gguf_file.metadata, gguf_file.tensors.keys())
    devices = DeviceMap.last_layers(gguf_file.tensors.keys(), LAYERS, LAYERS, head_gpu=True)
    return build_model(gguf_file, config, devices)


def new_pool(model: Model, n_seqs: int, kv: str = "f16") -> KVPool:
    return KVPool(model.config, n_seqs * TABLE, kv, [b.device for b in model.layers])


def decode_run(
    model: Model,
    prompts: list[list[int]],
    schedule: list[list[int]],
    graphs_for=None,
    kv: str = "f16",
) -> list[torch.Tensor]:
    """Prefill every prompt, then one decode step per entry of `schedule` (the indices of the
    sequences that step), greedy; → each step's logits (through graphs_for(pool) when given,
    else every step eagerly)."""
    runner = ModelRunner(model, len(prompts) * TABLE, kv, graphs=False)
    runner.graphs = graphs_for(runner.pool) if graphs_for else None
    tables = [list(range(s * TABLE, (s + 1) * TABLE)) for s in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    done = [0] * len(prompts)
    out = []
    with torch.inference_mode():
        first = ForwardBatch.build([(s, 0, t, True) for s, t in zip(seqs, tables, strict=True)])
        for s, row in zip(seqs, runner.run(first), strict=True):
            s.append(int(row.argmax()))
        done = [len(s) - 1 for s in seqs]
        for step in schedule:
            batch = ForwardBatch.build([([seqs[i][-1]], done[i], tables[i], True) for i in step])
            logits = runner.run(batch)
            out.append(logits)
            for i, row in zip(step, logits, strict=True):
                seqs[i].append(int(row.argmax()))
                done[i] += 1
    return out


PROMPTS = [[1, 5, 9, 2, 7], [3] * 17, [4, 8], [6, 1, 1], [2, 9, 9, 9, 9, 9, 9, 9]]
SCHEDULE = [[0, 1, 2], [0, 1, 2], [1], [0, 1, 2, 3, 4], [4, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_graph_steps_equal_forward_batch(on_gpu, kv):
    made = []

    def graphs_for(pool):
        made.append(DecodeGraphs(on_gpu, pool, max_blocks=TABLE, max_batch=6, capture=False))
        return made[0]

    want = decode_run(on_gpu, PROMPTS, SCHEDULE, kv=kv)
    got = decode_run(on_gpu, PROMPTS, SCHEDULE, graphs_for, kv=kv)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    used = {b.rows: b.steps for b in made[0]._buckets.values()}
    assert used == {4: 2, 1: 1, 6: 2, 2: 1}  # 3 → 4 and 5 → 6 padded


def test_steps_the_graphs_do_not_take_are_handed_back(on_gpu):
    graphs = DecodeGraphs(on_gpu, new_pool(on_gpu, 2), max_blocks=2, max_batch=2, capture=False)
    prefill = ForwardBatch.build([([1, 2, 3], 0, [0, 1], True)])
    mixed = ForwardBatch.build([([1], 3, [0, 1], True), ([4, 5], 0, [2, 3], True)])
    wide = ForwardBatch.build([([1], 40, [0, 1, 2], True)])  # a table past max_blocks
    many = ForwardBatch.build([([1], 0, [b], True) for b in range(3)])  # past max_batch
    with torch.inference_mode():
        assert all(graphs.run(b) is None for b in (prefill, mixed, wide, many))
    assert not graphs._buckets


def test_only_all_gpu_models_are_graphed(on_gpu, gguf_file):
    assert unsupported(on_gpu) is None
    cpu = build_model(gguf_file, on_gpu.config, DeviceMap.cpu_only(LAYERS))
    assert unsupported(cpu) == "layer 0 runs on the CPU"
    with pytest.raises(ValueError, match="every layer on the GPU"):
        DecodeGraphs(cpu, new_pool(cpu, 1), 4, 4, capture=False)
    engine_graphs = DecodeGraphs.for_engine(on_gpu, new_pool(on_gpu, 1), 64, 4)
    assert (engine_graphs is None) == (not torch.cuda.is_available())  # only with CUDA


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.gpu
def test_graph_replay_on_cuda(on_gpu):
    """On a CUDA card (the tiny model is then on cuda:0): every bucket is captured, and the
    replayed steps give the eager steps' logits."""
    made = []

    def graphs_for(pool):
        made.append(DecodeGraphs(on_gpu, pool, max_blocks=TABLE, max_batch=6))
        return made[0]

    want = decode_run(on_gpu, PROMPTS, SCHEDULE)
    got = decode_run(on_gpu, PROMPTS, SCHEDULE, graphs_for)
    assert made[0].capture and made[0].failed is None
    assert all(b.graph is not None for b in made[0]._buckets.values())
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_hybrid_tiny_model_agrees_with_all_cpu(on_gpu, gguf_file):
    """Layer 0 on the CPU, layer 1 and the head on the "GPU" (a real one where there is
    CUDA): prefill chunks and decodes cross devices at the layer boundary and come back for
    sampling. The paths differ in numerics (int8 activations on the CPU, float32 in Triton),
    so logits agree to within the quantization's error, not bit for bit."""
    names = gguf_file.tensors.keys()
    hybrid = build_model(
        gguf_file, on_gpu.config, DeviceMap.last_layers(names, LAYERS, 1, head_gpu=True)
    )
    cpu = build_model(gguf_file, on_gpu.config, DeviceMap.cpu_only(LAYERS))
    assert [b.triton for b in hybrid.layers] == [False, True]
    schedule = [[0, 1, 2], [1], [0, 2]]
    for got, want in zip(
        decode_run(hybrid, PROMPTS[:3], schedule),
        decode_run(cpu, PROMPTS[:3], schedule),
        strict=True,
    ):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0.1)  # seen: ≤ 0.06
