"""LoraAdapter: a LoRA adapter GGUF as llama.cpp's convert_lora_to_gguf.py writes it.

The file says `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`
(float; 0 or absent means "no alpha") and `general.architecture` (must match the base).
For each adapted weight `W` (GGUF name `<name>`) it holds two tensors:

    <name>.lora_a    GGUF ne = [in, r]   → torch (r, in)
    <name>.lora_b    GGUF ne = [r, out]  → torch (out, r)

and the adapted layer computes  y = W·x + scale · B·(A·x),  scale = alpha / r when alpha is
set, else 1 (llama.cpp's llama_adapter_lora_weight::get_scale, with r = b.ne[0]). Tensors
may be in any type tandem reads (F32, F16, BF16, Q8_0, ...); they are dequantized to
float32 once, at load: adapters are small (r ≪ in, out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loaders.gguf_file import GGUFFile
from quant.dequant import dequantize
from quant.errors import GGUFError, UnsupportedError


@dataclass(frozen=True)
class LoraWeight:
    a: torch.Tensor  # (r, in) float32
    b: torch.Tensor  # (out, r) float32
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """scale · B·A: what merging would add to the weight, (out, in)."""
        return self.scale * (self.b @ self.a)


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    arch: str
    alpha: float
    weights: dict[str, LoraWeight]  # base tensor name ("blk.0.attn_q.weight") → its pair

    @classmethod
    def read(cls, path: str | Path) -> LoraAdapter:
        with GGUFFile(path) as gguf:
            md = gguf.metadata
            kind = (md.get("general.type"), md.get("adapter.type"))
            if kind != ("adapter", "lora"):
                raise GGUFError(
                    f"{path} is not a LoRA adapter (general.type {kind[0]!r}, "
                    f"adapter.type {kind[1]!r}); convert one with llama.cpp's "
                    "convert_lora_to_gguf.py"
                )
            alpha = _alpha(gguf)
            names = _pairs(gguf)
            weights = {base: _weight(gguf, base, alpha) for base in names}
            return cls(Path(path), str(md.get("general.architecture", "")), alpha, weights)


def _alpha(gguf: GGUFFile) -> float:
    """adapter.lora.alpha: a finite, non-negative number (0 or absent: no alpha)."""
    value = gguf.metadata.get("adapter.lora.alpha", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = gguf.metadata_types["adapter.lora.alpha"].name.lower()
        raise GGUFError(
            f"{gguf.path}: metadata key 'adapter.lora.alpha' must be a number (float32), "
            f"got a {kind} {str(value)[:40]!r}"
        )
    if not math.isfinite(value) or value < 0:
        raise GGUFError(
            f"{gguf.path}: metadata key 'adapter.lora.alpha' must be a finite number >= 0, "
            f"got {value!r}"
        )
    return float(value)


def _pairs(gguf: GGUFFile) -> list[str]:
    bases = []
    for name in gguf.tensors:
        if name.endswith(".lora_a"):
            base = name.removesuffix(".lora_a")
            if base + ".lora_b" not in gguf.tensors:
                raise GGUFError(f"{gguf.path}: {name} has no matching {base}.lora_b")
            bases.append(base)
        elif not name.endswith(".lora_b"):
            raise UnsupportedError(
                f"{gguf.path}: tensor {name!r} is not a LoRA pair (.lora_a / .lora_b)"
            )
        elif name.removesuffix(".lora_b") + ".lora_a" not in gguf.tensors:
            raise GGUFError(f"{gguf.path}: {name} has no matching .lora_a")
    if not bases:
        raise GGUFError(f"{gguf.path}: the adapter holds no .lora_a/.lora_b tensors")
    return bases


def _tensor(gguf: GGUFFile, name: str) -> torch.Tensor:
    info = gguf.info(name)
    rows = dequantize(gguf.tensor(name), info.ggml_type)  # (n_rows, ne0) float32
    return rows.reshape(*reversed(info.shape)).clone()  # its own memory, not the mapping


def _weight(gguf: GGUFFile, base: str, alpha: float) -> LoraWeight:
    a, b = _tensor(gguf, base + ".lora_a"), _tensor(gguf, base + ".lora_b")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise GGUFError(
            f"{gguf.path}: {base}: lora_a {tuple(a.shape)} and lora_b "
            f"{tuple(b.shape)} (torch order) do not make (out, r)·(r, in)"
        )
    rank = a.shape[0]
    return LoraWeight(a, b, alpha / rank if alpha else 1.0)
