"""Model: a decoder-only transformer over packed GGUF weights, the parts every architecture
shares — token embeddings, the layer loop across devices, the output norm and head.

An architecture (runtime/models/llama.py, gemma3.py) subclasses it with two methods: which
tensors make one layer (`load_layer`) and that layer's math (`layer_forward`). Execution state
(KV pages, CUDA graphs, the step's inputs) is not here: ModelRunner (runtime/execution/model_runner.py)
owns it and hands the layer loop an `attend(i, q, k, v, window) → (T, H * Dv)` for the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.crossing import cross
from kernels.layer_ops import CPU_OPS, LayerOps, triton_ops
from kernels.linear import PackedLinear
from kernels.lora_linear import LoraLinear
from kernels.rope import Rope
from kernels.triton_linear import TritonLinear
from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from runtime.kv.attention_backends import (
    CPUPagedAttention,
    PagedAttention,
    TritonPagedAttention,
)
from runtime.models.weights import WeightLoader
from runtime.placement.device_map import CPU, GPU, DeviceMap

# attend(layer, q (T, H, D), k (T, Hkv, D), v (T, Hkv, Dv), window) → (T, H * Dv)
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
# a layer's matmul: packed rows on the CPU, Triton's on the GPU, LoRA-wrapped (runtime/models/lora.py)
Linear = PackedLinear | TritonLinear | LoraLinear


@dataclass
class Layer:
    """One transformer layer's weights, and where and how it runs."""

    attn_norm: torch.Tensor | None  # None: no norm before attention (olmo2)
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    ffn_norm: torch.Tensor | None
    gate: Linear
    up: Linear
    down: Linear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None
    device: torch.device = torch.device("cpu")  # where its activations and KV live
    triton: bool = False  # a GPU layer: Triton's kernels
    ops: LayerOps = CPU_OPS  # its norms, RoPE and activation: Triton's on a GPU layer
    attention: PagedAttention | None = None  # its attention backend


class Model:
    """Subclasses set `architectures` and implement load_layer and layer_forward."""

    architectures: tuple[str, ...] = ()
    num_threads: int = 0  # CPU threads its forward uses (num_thread; 0: torch's count)
    swa_rope_scaled = False  # sliding-window layers' rope scaled as the others' (gpt-oss)

    def __init__(
        self, gguf: GGUFFile, config: ModelConfig, devices: DeviceMap | None = None
    ) -> None:
        self.config = c = config
        self.devices = devices = devices or DeviceMap.cpu_only(config.n_layer)
        self.weight_bytes = gguf.file_size - gguf.data_offset
        w = WeightLoader(gguf, config, devices)
        head_where = devices.head
        # The lookup runs on the CPU; a tied head on the CPU is this same layer, in panels.
        self.embed = w.linear(
            "token_embd.weight", where=CPU, panels=c.tied_head and head_where == CPU
        )
        self.head_device = devices.device(head_where)
        self.head_ops = triton_ops() if head_where == GPU else CPU_OPS
        self.head: Linear
        if c.tied_head:
            self.head = (
                self.embed if head_where == CPU else w.linear("token_embd.weight", where=GPU)
            )
        else:
            self.head = w.linear("output.weight", where=head_where)
        self.output_norm = w.vector("output_norm.weight", self.head_device)
        backends = {
            CPU: CPUPagedAttention(c.attn_scale, c.head_dim_v, c.attn_softcap),
            GPU: (
                TritonPagedAttention(c.attn_scale, c.head_dim_v, c.attn_softcap)
                if GPU in devices.layers
                else None
            ),
        }
        self.layers = []
        for i, where in enumerate(devices.layers):
            layer = self.load_layer(w, i, f"blk.{i}.", devices.device(where))
            layer.triton = where == GPU
            layer.ops = triton_ops() if layer.triton else CPU_OPS
            layer.attention = backends[where]
            self.layers.append(layer)
        self.rope = self.make_rope(w, c.rope_base, scaled=True)
        self.rope_swa = self.make_rope(w, c.rope_base_swa, scaled=self.swa_rope_scaled)

    def make_rope(self, w: WeightLoader, base: float, scaled: bool) -> Rope:
        """A rope at `base`: with the file's scaling (factor, YaRN, frequency factors,
        magnitude) where `scaled`, else plain (sliding-window layers unless the architecture
        sets swa_rope_scaled: llama.cpp's default rope_freq_scale_train_swa is 1)."""
        c = self.config
        if not scaled:
            return Rope(c.head_dim, base, c.rope_neox)
        return Rope(
            c.head_dim,
            base,
            c.rope_neox,
            c.rope_scale,
            factors=self.rope_factors(w),
            yarn=c.rope_scaling == "yarn",
            orig_ctx=c.rope_orig_ctx,
            beta_fast=c.yarn_beta_fast,
            beta_slow=c.yarn_beta_slow,
            log_mul=c.yarn_log_mul,
            attn_factor=c.rope_attn_factor,
        )

    def rope_factors(self, w: WeightLoader) -> torch.Tensor | None:
        """The rope's per-pair frequency divisors (D/2,): Llama 3.x's `rope_freqs`, else
        LongRoPE's short factors (llama.cpp reads the long ones only for a context past
        rope.scaling.original_context_length; tandem's contexts stay short of it), else None."""
        for name in ("rope_freqs.weight", "rope_factors_short.weight"):
            if w.has(name):
                return w.vector(name, torch.device("cpu"))
        return None

    # ---- what an architecture describes ----------------------------------------------
    def load_layer(self, w: WeightLoader, i: int, p: str, device: torch.device) -> Layer:
        """Layer i's weights (tensor names start with p = "blk.{i}."); norms on `device`."""
        raise NotImplementedError

    def layer_forward(
        self, i: int, b: Layer, x, h, rope: Rope, tables, window: int, attend: Attend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i on x (T, E) whose attention-normed form is h: → (x after the attention's
        residual add, the FFN's output f); the caller adds f (with the next layer's norm)."""
        raise NotImplementedError

    # ---- the forward ---------------------------------------------------------------
    def embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (T,) → their scaled embeddings (T, E) float32, on the CPU."""
        x = self.embed.rows(tokens)
        return x * self.config.embed_scale if self.config.embed_scale != 1.0 else x

    def rope_tables(self, positions: torch.Tensor) -> dict[bool, tuple[torch.Tensor, ...]]:
        """positions (T,) → {sliding-window layer?: (cos, sin) (T, 1, D/2)}, on the CPU."""
        tables = {False: self.rope.tables(positions)}
        if self.config.sliding_window:
            tables[True] = self.rope_swa.tables(positions)
        return tables

    def run_layers(self, x: torch.Tensor, tables: dict, attend: Attend) -> torch.Tensor:
        """Every layer on x (T, E) with rope tables from rope_tables → hidden (T, E) on the
        head's device. The hidden state moves only where consecutive layers' devices differ;
        on a model whose layers and tables are all on the GPU already, nothing moves (and
        nothing here reads back to the host: the step can be captured in a CUDA graph)."""
        c = self.config
        on_device: dict = {}
        h = None  # the next layer's normed input, when made together with its residual add
        for i, layer in enumerate(self.layers):
            swa = bool(c.swa_layers[i]) and bool(c.sliding_window)
            key = (layer.device, swa)
            if key not in on_device:
                on_device[key] = tuple(cross(t, layer.device) for t in tables[swa])
            rope = self.rope_swa if swa else self.rope
            window = c.sliding_window if c.swa_layers[i] else 0
            x = cross(x, layer.device)
            if h is None:
                h = (
                    x
                    if layer.attn_norm is None
                    else layer.ops.rms_norm(x, layer.attn_norm, c.rms_eps)
                )
            x, f = self.layer_forward(i, layer, x, h, rope, on_device[key], window, attend)
            after = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if after is not None and after.device == layer.device and after.attn_norm is not None:
                x, h = layer.ops.add_rms_norm(x, f, after.attn_norm, c.rms_eps)
            else:
                x, h = x + f, None
        return cross(x, self.head_device)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states (R, E) → logits (R, V), on the head's device."""
        return self.head(self.head_ops.rms_norm(x, self.output_norm, self.config.rms_eps))
