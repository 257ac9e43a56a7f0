"""PackedExperts: a mixture-of-experts weight (E experts × N rows × K) kept in its GGML block
format, and the routed matmul over it: row r of the result is x[src[r]] · W[expert[r]]ᵀ (+ b).

On the CPU, three paths, each grouping the rows by expert so that every chosen expert's
weights stream from memory once per call for all the rows that chose it:
- panels (kernels/native/interleaved.cpp `imoe_matmul_many`), for every type with a panel
  kernel in this build (Q4_0 … Q6_K, IQ4_XS, MXFP4) and N a multiple of 16: the experts' rows re-laid
  out once in 16-row panels (`interleave` of the (E·N, row_bytes) rows: expert e is panels
  [e·N/16, (e+1)·N/16), one contiguous stream), the dense layers' fast kernels per expert;
- GGML rows (kernels/native/moe.cpp `moe_matmul_many`: MXFP4, Q4_0, Q8_0), a row at a time,
  where panels do not apply (N not a multiple of 16, or a build without panel kernels);
- other types in Python: one native qmatmul (or dequantize-and-matmul) per chosen expert.
Threads split over (weight, expert, rows) in both native paths. On the GPU, Triton's grouped
kernel (kernels/triton/moe.py) on the GGUF's (E, N, row_bytes) rows.

`expert_stats()` counts calls, expert streams (one per weight and chosen expert per call) and
the bytes they read, over every path, for the tests and the bandwidth figures.
"""

from __future__ import annotations

import threading

import torch

from kernels import native_loader
from quant.dequant import dequantize
from quant.formats import block_format

_lock = threading.Lock()
_python_stats = [0, 0, 0]  # calls, streams, bytes of the non-native paths


class PackedExperts:
    """weight (E, N, row_bytes) uint8 of `ggml_type` over in_features K; bias (E, N) or None."""

    def __init__(
        self,
        weight: torch.Tensor,
        ggml_type: int,
        in_features: int,
        bias: torch.Tensor | None = None,
        triton: bool = False,
        panels: torch.Tensor | None = None,
    ) -> None:
        """triton: a GPU weight, run by kernels/triton/moe.py (also in Triton's CPU
        interpreter, where the "GPU" tensors are CPU ones). panels: `interleave_experts(weight,
        ggml_type)`, made by the caller; products then read only those (`weight` may be a
        meta tensor of the rows' shape)."""
        fmt = block_format(ggml_type)
        if weight.dim() != 3 or weight.shape[2] != fmt.row_bytes(in_features):
            raise ValueError(
                f"expert weight {tuple(weight.shape)} does not hold (E, N) rows of "
                f"{in_features} {fmt.name} elements"
            )
        self.weight = weight.contiguous()  # (E, N, row_bytes) uint8
        self.ggml_type = int(ggml_type)
        self.in_features = in_features
        self.n_experts, self.out_features = weight.shape[0], weight.shape[1]
        self.bias = bias  # (E, N) float32
        self.row_bytes = weight.shape[2]
        self.triton = triton or weight.device.type not in ("cpu", "meta")
        self.device = torch.device("cpu") if panels is not None else weight.device
        module = native_loader.load() if native_loader.enabled() and not self.triton else None
        self.panels = panels if module is not None else None  # (E·N/16, panel_bytes) uint8
        self._module = module if module is not None and module.moe_supports(ggml_type) else None
        self._panel_module = module if self.panels is not None else None

    def __call__(self, x: torch.Tensor, src: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        return expert_matmuls([self], x, src, expert)[0]


def expert_matmuls(
    experts: list[PackedExperts], x: torch.Tensor, src: torch.Tensor, expert: torch.Tensor
) -> list[torch.Tensor]:
    """[y_i (R, N_i)]: y_i[r] = x[src[r]] · W_i[expert[r]]ᵀ (+ b_i[expert[r]]) for x (T, K)
    float32 and src, expert (R,) int64 — the weights sharing one input (gate and up) in one
    native call where they share a type."""
    first = experts[0]
    src, expert = src.long(), expert.long()
    if first._panel_module is not None and all(
        e.panels is not None and e.ggml_type == first.ggml_type for e in experts
    ):
        ys = first._panel_module.imoe_matmul_many(
            x.contiguous(),
            [e.panels for e in experts],
            [e.out_features for e in experts],
            first.ggml_type,
            src,
            expert,
        )
    elif first.triton:
        from kernels.triton.moe import moe_matmul

        ys = [moe_matmul(x, e.weight, e.ggml_type, src, expert) for e in experts]
        _count(experts, expert)
    elif first._module is not None and all(e.ggml_type == first.ggml_type for e in experts):
        ys = first._module.moe_matmul_many(
            x.contiguous(), [e.weight for e in experts], first.ggml_type, src, expert
        )
    else:
        ys = [_grouped(e, x, src, expert) for e in experts]
        _count(experts, expert)
    return [
        y + e.bias[expert] if e.bias is not None else y for y, e in zip(ys, experts, strict=True)
    ]


ACTIVATIONS = {"silu": 0, "swiglu_oai": 1}  # imoe_ffn's activation codes


def routed_ffn(
    gate: PackedExperts,
    up: PackedExperts,
    down: PackedExperts,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    activation: str,
) -> torch.Tensor | None:
    """A whole routed feed-forward in one native call (kernels/native/moe_ffn.cpp):
    out[t] = Σ_j weights[t, j] · down_e(act(gate_e(x_t), up_e(x_t))), e = ids[t, j], biases
    included, for x (T, K) float32 and ids, weights (T, k) → (T, K); None where that call does
    not apply (experts not in CPU panels, gate and up of two types, another activation): the
    caller then runs expert_matmuls and the activation itself."""
    module = gate._panel_module
    if (
        module is None
        or up.panels is None
        or down.panels is None
        or down._panel_module is None
        or up.ggml_type != gate.ggml_type
        or activation not in ACTIVATIONS
    ):
        return None
    return module.imoe_ffn(
        x.contiguous(),
        ids.long(),
        weights.float(),
        gate.panels,
        up.panels,
        down.panels,
        gate.ggml_type,
        down.ggml_type,
        ACTIVATIONS[activation],
        gate.bias,
        up.bias,
        down.bias,
    )


# imoe_route up to a 16-stream decode step (measured faster than torch's there); prefill: sgemm
ROUTE_MAX_TOKENS = 16


def route_topk(
    router: object, h: torch.Tensor, k: int, softmax_first: bool, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A float32 CPU router's top-k in one native call (kernels/native/moe_ffn.cpp
    imoe_route) for h (T, K) of at most ROUTE_MAX_TOKENS tokens → (weights (T, k) float32,
    ids (T, k) int64); None where it does not apply (the caller then routes in torch)."""
    w = getattr(router, "float_weight", None)
    module = getattr(router, "_module", None)  # the native build the linear looked up once
    if w is None or module is None or not h.is_cpu or h.shape[0] > ROUTE_MAX_TOKENS:
        return None
    bias = getattr(router, "bias", None)
    weights, ids = module.imoe_route(h, w, bias, k, softmax_first, normalize)
    return weights, ids


def interleave_experts(weight: torch.Tensor, ggml_type: int) -> torch.Tensor | None:
    """Expert rows (E, N, row_bytes) in 16-row panels, expert by expert (E·N/16, panel_bytes),
    or None where the panel path does not apply: no panel kernel for the type in this build,
    or N not a multiple of 16 (a panel would straddle two experts)."""
    module = native_loader.load() if native_loader.enabled() else None
    if module is None or not module.interleaved_supports(int(ggml_type)) or weight.shape[1] % 16:
        return None
    return module.interleave(weight.reshape(-1, weight.shape[2]), int(ggml_type))


def _grouped(e: PackedExperts, x: torch.Tensor, src: torch.Tensor, expert: torch.Tensor):
    """One matmul per chosen expert over the rows that chose it (types moe.cpp lacks)."""
    y = torch.empty(src.shape[0], e.out_features, dtype=torch.float32)
    native = native_loader.supports(e.ggml_type)
    for chosen in torch.unique(expert).tolist():
        rows = (expert == chosen).nonzero().squeeze(1)  # (n,)
        xs = x[src[rows]].contiguous()
        w = e.weight[chosen]  # (N, row_bytes): expert `chosen`, contiguous
        if native:
            y[rows] = native_loader.qmatmul(xs, w, e.ggml_type)
        else:
            y[rows] = xs @ dequantize(w, e.ggml_type).T
    return y


def _count(experts: list[PackedExperts], expert: torch.Tensor) -> None:
    chosen = int(torch.unique(expert).numel())
    with _lock:
        _python_stats[0] += 1
        _python_stats[1] += chosen * len(experts)
        _python_stats[2] += chosen * sum(e.out_features * e.row_bytes for e in experts)


def expert_stats(reset: bool = False) -> dict[str, int]:
    """{"calls", "streams", "bytes"} of routed matmuls since the last reset, every path."""
    module = native_loader.load() if native_loader.enabled() else None
    native = list(module.moe_stats(reset)) if module is not None else [0, 0, 0]
    with _lock:
        total = [a + b for a, b in zip(native, _python_stats, strict=True)]
        if reset:
            _python_stats[:] = [0, 0, 0]
    return dict(zip(("calls", "streams", "bytes"), total, strict=True))
