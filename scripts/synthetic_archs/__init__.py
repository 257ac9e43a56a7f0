"""The architecture table of scripts/make_synthetic_gguf.py: for each architecture, the
tensors a GGUF of it holds (names and shapes), the metadata keys llama.cpp and tandem read,
and the small dimensions a conformance model uses.

    from synthetic_archs import ARCHITECTURES, Dims
    arch = ARCHITECTURES["qwen2"]
    arch.tensors(arch.dims)      # [TensorSpec("token_embd.weight", (V, E), "embed"), ...]
    arch.metadata(arch.dims)     # {"qwen2.block_count": 2, ...}

How to add an architecture
--------------------------
Add one file `scripts/synthetic_archs/<arch>.py` (no other file changes: every module of this
package is imported and every `Architecture` in its `ENTRIES` tuple is registered by name).
Build the entry from llama.cpp's `src/models/<arch>.cpp` (`load_arch_tensors` lists the
tensors and their shapes, `load_arch_hparams` the keys it reads) and gguf-py's
`constants.py` (tensor and key names):

- `name`: the `general.architecture` string;
- `layer`: the per-block tensors, `blk.{i}.` omitted, each a TensorSpec(name, shape, kind)
  whose shape is in numpy order (rows, cols) — GGUF's ne reversed — with symbolic sizes
  from Dims (`E` n_embd, `F` n_ff, `Q` n_head·head_dim, `KV` n_head_kv·head_dim, `D`
  head_dim, `H` n_head, `V` vocab, `X` experts, `FX` expert FFN, `LV` delta-net v heads, `KD`/`VD`
  their q/k and v widths; an int is taken as is), and
  kind one of `linear` (random, written in the chosen quant type), `router` (random, F32),
  `norm` (≈1, F32), `bias` (small, F32), `decay` (a delta net's negative rates, F32),
  `embed`; `layer_extra(i, dims)` adds tensors that only some blocks have; `mtp`: the
  tensors of a multi-token-prediction block, written for `dims.nextn` blocks (--mtp);
- `tied`: no `output.weight` (the head reuses token_embd) — only where llama.cpp ties it
  (gemma2/3). Otherwise keep the untied random head: at head_scale 8 its log-probabilities
  fall below llama.cpp's -16 cut for all but a few hundred tokens a position, so the CI
  fixture (which keeps the entries above the cut) is ~300 KB; a tied head confident enough
  for the test needs a small head_scale that keeps thousands above it (16-20 MB);
- `extra_metadata(dims)`: the keys beyond the common llama-style ones (`base_metadata`
  below writes block_count, context_length, embedding_length, feed_forward_length, head
  counts, key/value length, rope base and dimension count, rms eps, vocab_size), e.g.
  sliding windows, soft-caps, multipliers, expert counts;
- `dims`: small sizes that still exercise the architecture (e.g. enough layers to reach a
  global layer after the sliding-window ones) and keep a CPU forward to milliseconds;
- `llama_cpp_name`: where llama.cpp knows the same graph under another name only (mistral
  → llama), conformance.py gives llama.cpp the same model under that name;
- `sizes`: real shapes by name (`--size 30b-a3b`), for metadata-only files (`--metadata-only`:
  the header and tensor table, the weight bytes a hole), and `real_type(name, default, layers)`:
  the type a real quantization gives a tensor of a `layers`-layer model (e.g. Q6_K for
  attn_v in Q4_K_M's use_more_bits layers) — the `ggml_type` name, or `default`;
- `expert_type`: the type of the routed experts (`ffn_*_exps`) when it is not --type (gpt-oss:
  MXFP4);
- `head_scale`: the output norm's value, which sets how confident the random model is
  (llama.cpp's mean top-1 probability on the test text must be ≥ 0.3; scripts/conformance.py
  prints it) — raise it when the model is not confident enough.

Then `python scripts/make_synthetic_gguf.py --arch <arch> --out /tmp/x.gguf`, check that
llama.cpp loads it (`scripts/conformance.py --arch <arch>`), and record the CI fixture with
`scripts/conformance.py --arch <arch> --record`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Dims:
    """A synthetic model's sizes."""

    layers: int = 2
    dim: int = 128  # E
    ffn: int = 256  # F
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32  # D
    ctx: int = 4096  # context_length written to the file
    experts: int = 0  # X
    experts_used: int = 0
    expert_ffn: int = 0  # FX
    window: int = 0  # sliding window (0: none)
    # hybrid linear attention (qwen35): delta-net q/k heads and v heads (KD, VD, LV), every
    # `interval`-th layer attention; `nextn` multi-token-prediction blocks after the layers
    linear_k_heads: int = 0
    linear_v_heads: int = 0
    linear_head_dim: int = 0  # a delta-net head's size (ssm.state_size)
    interval: int = 0
    nextn: int = 0
    tied: bool = False  # the real model ties its head to token_embd (no output.weight)

    def size(self, symbol: str | int, vocab: int) -> int:
        """The number a shape symbol stands for."""
        if isinstance(symbol, int):
            return symbol
        if "+" in symbol:  # a fused tensor's parts: "Q+2KV"
            return sum(self.size(part, vocab) for part in symbol.split("+"))
        if symbol[0].isdigit():  # a multiple: "2F"
            return int(symbol[0]) * self.size(symbol[1:], vocab)
        table = {
            "E": self.dim,
            "F": self.ffn,
            "Q": self.heads * self.head_dim,
            "KV": self.kv_heads * self.head_dim,
            "D": self.head_dim,
            "R": self.head_dim // 2,  # rope frequency pairs
            "V": vocab,
            "X": self.experts,
            "FX": self.expert_ffn,
            "H": self.heads,
            "LV": self.linear_v_heads,
            "KD": self.linear_k_heads * self.linear_head_dim,
            "VD": self.linear_v_heads * self.linear_head_dim,
        }
        return table[symbol]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[str | int, ...]  # numpy order: (rows, cols), or (experts, rows, cols)
    kind: str = "linear"  # linear | norm | bias | embed


def spec(name: str, *shape: str | int, kind: str = "linear") -> TensorSpec:
    return TensorSpec(name, tuple(shape), kind)


# The llama block: pre-norm GQA attention and a SwiGLU feed-forward.
LLAMA_LAYER = (
    spec("attn_norm.weight", "E", kind="norm"),
    spec("attn_q.weight", "Q", "E"),
    spec("attn_k.weight", "KV", "E"),
    spec("attn_v.weight", "KV", "E"),
    spec("attn_output.weight", "E", "Q"),
    spec("ffn_norm.weight", "E", kind="norm"),
    spec("ffn_gate.weight", "F", "E"),
    spec("ffn_up.weight", "F", "E"),
    spec("ffn_down.weight", "E", "F"),
)


def base_metadata(arch: str, d: Dims, vocab: int) -> dict[str, Any]:
    """The keys (nearly) every llama-style architecture reads, with `arch.` prefixed."""
    keys = {
        "block_count": d.layers,
        "context_length": d.ctx,
        "embedding_length": d.dim,
        "feed_forward_length": d.ffn,
        "attention.head_count": d.heads,
        "attention.head_count_kv": d.kv_heads,
        "attention.key_length": d.head_dim,
        "attention.value_length": d.head_dim,
        "rope.dimension_count": d.head_dim,
        "rope.freq_base": 10000.0,
        "attention.layer_norm_rms_epsilon": 1e-5,
        "vocab_size": vocab,
    }
    return {f"{arch}.{k}": v for k, v in keys.items()}


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's use_more_bits for layer i of n: the first and last eighth, and every
    third between (where Q4_K_M puts Q6_K in attn_v and ffn_down)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _no_extra(d: Dims) -> dict[str, Any]:
    return {}


def _no_layer_extra(i: int, d: Dims) -> tuple[TensorSpec, ...]:
    return ()


@dataclass(frozen=True)
class Architecture:
    name: str
    layer: tuple[TensorSpec, ...]
    dims: Dims = field(default_factory=Dims)
    tied: bool = False
    head_scale: float = 8.0  # output_norm.weight's value: the random model's confidence
    extra_metadata: Callable[[Dims], dict[str, Any]] = _no_extra  # keys without `arch.`
    layer_extra: Callable[[int, Dims], tuple[TensorSpec, ...]] = _no_layer_extra
    note: str = ""  # what the synthetic model exercises (printed by conformance.py)
    # the architecture name llama.cpp runs the same model under, where it has no entry of
    # this name (mistral: llama.cpp's converter writes Mistral 7B as "llama")
    llama_cpp_name: str = ""
    # tensors outside the blocks besides token_embd / output (rope_freqs, rope_factors_*)
    globals: tuple[TensorSpec, ...] = ()
    # the general.architecture written, where the entry is a variant of another (llama3:
    # llama with rope_freqs) (default: name)
    arch_name: str = ""
    # general.name (default "synthetic ARCH …"), where llama.cpp keys behaviour on the name
    # (phi3: a name with "phi3" makes its vocabulary loader look up phi-3's own tokens)
    model_name: str = ""
    sizes: dict[str, Dims] = field(default_factory=dict)  # real shapes (--size)
    # (name, default, layers) → the type a real quantization gives the tensor
    real_type: Callable[[str, str, int], str] = lambda name, default, layers: default
    expert_type: str | None = None  # the routed experts' type, when not --type
    # a multi-token-prediction block's tensors (qwen35: `blk.{layers + j}.`, j < dims.nextn),
    # written after every other tensor so that the rest keep their seeds and bytes
    mtp: tuple[TensorSpec, ...] = ()

    def tensors(self, d: Dims, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, numpy shape, kind) of every tensor, in llama.cpp's order."""
        out = [("token_embd.weight", (vocab, d.dim), "embed")]
        out += [(t.name, tuple(d.size(s, vocab) for s in t.shape), t.kind) for t in self.globals]
        for i in range(d.layers):
            for t in (*self.layer, *self.layer_extra(i, d)):
                shape = tuple(d.size(s, vocab) for s in t.shape)
                out.append((f"blk.{i}.{t.name}", shape, t.kind))
        out.append(("output_norm.weight", (d.dim,), "head_norm"))
        if not (self.tied or d.tied):
            out.append(("output.weight", (vocab, d.dim), "linear"))
        for j in range(d.nextn):
            for t in self.mtp:
                shape = tuple(d.size(s, vocab) for s in t.shape)
                out.append((f"blk.{d.layers + j}.{t.name}", shape, t.kind))
        return out

    def metadata(self, d: Dims, vocab: int, name: str = "") -> dict[str, Any]:
        """Every `arch.*` key of the file (`name.*` where given)."""
        if not name or name == self.name:  # a variant is written as its arch_name
            name = self.arch_name or self.name
        extra = {f"{name}.{k}": v for k, v in self.extra_metadata(d).items()}
        if d.nextn:  # block_count counts the MTP blocks too (llama.cpp's n_layer_all)
            extra |= {f"{name}.block_count": d.layers + d.nextn}
            extra |= {f"{name}.nextn_predict_layers": d.nextn}
        return base_metadata(name, d, vocab) | extra


def _discover() -> dict[str, Architecture]:
    table: dict[str, Architecture] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        for entry in importlib.import_module(f"{__name__}.{module}").ENTRIES:
            if entry.name in table:
                raise ValueError(f"architecture {entry.name!r} is defined twice ({module})")
            table[entry.name] = entry
    return dict(sorted(table.items()))


ARCHITECTURES: dict[str, Architecture] = _discover()
