"""Model: the transformer forward pass over packed GGUF weights (llama family, gemma3).

Weights stay packed (no dequantized model): CPU linears read 16-row panels copied once from
the mmapped file (the same bytes per row, shared by every model on the file; see
kernels/linear.py) or, where the build has no panel kernel, views of the mapping; norms
are small float32 tensors. `forward_batch` runs the new tokens of several sequences (prefill
chunks and decode steps mixed) through every linear layer together, with attention per
sequence over its pages in a KVPool; `forward` runs one sequence over a contiguous KVCache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention import attention, decode_attention, paged_decode_attention
from kernels.crossing import cross
from kernels.layer_ops import CPU_OPS, LayerOps, triton_ops
from kernels.linear import PackedLinear, interleave, matmuls
from kernels.rope import Rope
from kernels.thread_policy import forward_threads
from kernels.triton_linear import TritonLinear
from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from quant.dequant import dequantize
from runtime.block_manager import BLOCK_SIZE as PAGE
from runtime.device_map import CPU, GPU, DeviceMap
from runtime.errors import GGUFError
from runtime.forward_batch import ForwardBatch
from runtime.kv_cache import KVCache
from runtime.kv_pool import KVPool


@dataclass
class Block:
    """One transformer layer's weights."""

    attn_norm: torch.Tensor
    q: PackedLinear
    k: PackedLinear
    v: PackedLinear
    o: PackedLinear
    ffn_norm: torch.Tensor
    gate: PackedLinear
    up: PackedLinear
    down: PackedLinear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None
    device: torch.device = torch.device("cpu")  # where its activations and KV live
    triton: bool = False  # attention through the Triton kernels (a GPU layer)
    ops: LayerOps = CPU_OPS  # its norms, RoPE and activation: Triton's on a GPU layer


class Model:
    def __init__(
        self, gguf: GGUFFile, config: ModelConfig, devices: DeviceMap | None = None
    ) -> None:
        self.config = config
        self._gguf = gguf
        self.devices = devices or DeviceMap.cpu_only(config.n_layer)
        head_where = self.devices.head
        # The lookup runs on the CPU; a tied head on the CPU is this same layer, in panels.
        self.embed = self._linear(
            "token_embd.weight", where=CPU, panels=config.tied_head and head_where == CPU
        )
        self.head_device = self.devices.device(head_where)
        self.head_ops = triton_ops() if head_where == GPU else CPU_OPS
        if config.tied_head:
            self.head = (
                self.embed if head_where == CPU else self._linear("token_embd.weight", where=GPU)
            )
        else:
            self.head = self._linear("output.weight", where=head_where)
        self.output_norm = self._vector("output_norm.weight", self.head_device)
        self.blocks = [self._block(i) for i in range(config.n_layer)]
        c = config
        self.rope = Rope(c.head_dim, c.rope_base, c.rope_neox, c.rope_scale)
        self.rope_swa = Rope(c.head_dim, c.rope_base_swa, c.rope_neox)

    # ---- loading -------------------------------------------------------------------
    def _info(self, name: str):
        if name not in self._gguf.tensors:
            raise GGUFError(
                f"{self._gguf.path.name}: tensor '{name}' is missing for a {self.config.arch} model"
            )
        return self._gguf.tensors[name]

    def _linear(
        self, name: str, bias: str | None = None, where: str | None = None, panels: bool = True
    ) -> PackedLinear | TritonLinear:
        """A packed weight on its device: Triton's on the GPU; on the CPU the native path,
        over 16-row panels made once per file (see kernels/linear.py) unless `panels` is
        False (a lookup-only embedding) or the build has no panel kernel for the type."""
        info = self._info(name)
        where = where or self.devices.of_tensor(name)
        device = self.devices.device(where)
        b = self._vector(bias, device) if bias and bias in self._gguf.tensors else None
        weight = self._gguf.tensor(name)
        if where == GPU:
            return TritonLinear(weight, info.ggml_type, info.shape[0], b, device)
        made = self._gguf.derived(("panels", name), lambda: self._panels(name)) if panels else None
        return PackedLinear(weight, info.ggml_type, info.shape[0], b, panels=made)

    def _linears(self, names: list[str], biases: list[str | None]) -> list:
        """The linears of `names`, which read one input (q/k/v; gate/up): stacked into one
        device weight when all are on the GPU with one type and width (and all or none
        biased), so that they run as one launch; else one by one."""
        infos = [self._info(n) for n in names]
        biased = [b is not None and b in self._gguf.tensors for b in biases]
        if (
            all(self.devices.of_tensor(n) == GPU for n in names)
            and len(set(biased)) == 1
            and len({(i.ggml_type, i.shape[0]) for i in infos}) == 1
        ):
            device = self.devices.device(GPU)
            return TritonLinear.stacked(
                [self._gguf.tensor(n) for n in names],
                infos[0].ggml_type,
                infos[0].shape[0],
                [
                    self._vector(b, device) if on else None
                    for b, on in zip(biases, biased, strict=True)
                ],
                device,
            )
        return [self._linear(n, b) for n, b in zip(names, biases, strict=True)]

    def _panels(self, name: str) -> torch.Tensor | None:
        made = interleave(self._gguf.tensor(name), self._info(name).ggml_type)
        if made is not None:
            self._gguf.release_pages(name)  # the panels are the copy that is read from now on
        return made

    def _vector(self, name: str, device: torch.device) -> torch.Tensor:
        info = self._info(name)
        return dequantize(self._gguf.tensor(name), info.ggml_type).reshape(-1).to(device)

    def _block(self, i: int) -> Block:
        p, c = f"blk.{i}.", self.config
        where = self.devices.layers[i]
        dev = self.devices.device(where)
        q, k, v = self._linears(
            [p + f"attn_{x}.weight" for x in "qkv"], [p + f"attn_{x}.bias" for x in "qkv"]
        )
        gate, up = self._linears([p + "ffn_gate.weight", p + "ffn_up.weight"], [None, None])
        block = Block(
            attn_norm=self._vector(p + "attn_norm.weight", dev),
            q=q,
            k=k,
            v=v,
            o=self._linear(p + "attn_output.weight"),
            ffn_norm=self._vector(p + "ffn_norm.weight", dev),
            gate=gate,
            up=up,
            down=self._linear(p + "ffn_down.weight"),
            device=dev,
            triton=where == GPU,
            ops=triton_ops() if where == GPU else CPU_OPS,
        )
        if c.qk_norm:
            block.q_norm = self._vector(p + "attn_q_norm.weight", dev)
            block.k_norm = self._vector(p + "attn_k_norm.weight", dev)
        if c.post_norms:
            block.post_attn_norm = self._vector(p + "post_attention_norm.weight", dev)
            block.post_ffn_norm = self._vector(p + "post_ffw_norm.weight", dev)
        return block

    @property
    def weight_bytes(self) -> int:
        return self._gguf.file_size - self._gguf.data_offset

    # ---- forward -------------------------------------------------------------------
    def forward(
        self, tokens: torch.Tensor, start: int, cache: KVCache, all_logits: bool = False
    ) -> torch.Tensor:
        """One sequence with a contiguous KVCache (tests, perplexity): tokens (T,) int64 at
        positions start … start+T-1 → logits (T or 1, V) float32. The cache is on the CPU, so
        a GPU layer's keys and values cross to it every call: a reference path, not a fast
        one (the engine's forward_batch keeps each layer's KV on its device)."""
        positions = torch.arange(start, start + tokens.shape[0])
        # One new token on an f16 cache: the engine's decode kernel, the contiguous slab read
        # as pages 0, 1, 2, … (a table of consecutive blocks).
        n = start + tokens.shape[0]
        blocks = -(-n // PAGE)
        paged = (
            tokens.shape[0] == 1 and cache.dtype == torch.float16 and blocks * PAGE <= cache.n_ctx
        )  # the kernel wants whole pages in the slab
        table = torch.arange(blocks, dtype=torch.int32)[None] if paged else None
        length = torch.tensor([n])

        def attend(i, q, k, v, window):
            cache.write(i, start, k, v)
            if paged and self.blocks[i].device.type == "cpu":
                out = paged_decode_attention(
                    q, cache.k[i], cache.v[i], table, length, self.config.attn_scale, window
                )
                if out is not None:
                    return out
            keys, values = cache.read(i, n)  # the cache is on the CPU; a GPU layer's q is not
            return attention(
                q,
                cross(keys, q.device),
                cross(values, q.device),
                start,
                window,
                self.config.attn_scale,
            )

        with forward_threads():
            x = self._layers(tokens, positions, attend)
            return self.logits(x if all_logits else x[-1:])

    def forward_batch(self, batch: ForwardBatch, pool: KVPool) -> torch.Tensor:
        """Several sequences' new tokens in one pass over the weights, their KV in `pool`
        → logits (R, V) for batch.logit_rows."""

        def attend(i, q, k, v, window):
            block = self.blocks[i]
            b = batch.on(block.device)
            if block.triton:
                return self._attend_triton(i, b, pool, q, k, v, window)
            pool.write(i, b.slots, k, v)
            d = b.decode
            if d is not None and not b.seqs:  # decodes only: row b is sequence b
                return self._decode_attention(i, pool, q, d, window)
            out = self._attend_chunks(i, b, pool, q, window)
            if d is not None:
                out[d.rows] = self._decode_attention(i, pool, q[d.rows], d, window)
            return out

        with forward_threads():
            x = self._layers(batch.tokens, batch.positions, attend)
            return self.logits(x[batch.logit_rows.to(x.device)])

    def _attend_chunks(
        self, i: int, b: ForwardBatch, pool: KVPool, q: torch.Tensor, window: int
    ) -> torch.Tensor:
        """The output buffer (T, H*Dv), with the prefill chunks' attention filled in: each
        chunk's queries over its sequence's pages so far (the decode rows are left to fill)."""
        out = q.new_empty(q.shape[0], q.shape[1] * self.config.head_dim_v)
        for s in b.seqs:
            rows = slice(s.row, s.row + s.n)
            # a sliding window: the chunk's first query sees back to start − window + 1 only
            first = max(0, s.start + 1 - window) if window else 0
            keys, values = pool.read(i, s.context_slots[first:])
            out[rows] = attention(
                q[rows], keys, values, s.start - first, window, self.config.attn_scale
            )
        return out

    def _decode_attention(self, i: int, pool: KVPool, q: torch.Tensor, d, window: int):
        """The one-token sequences' attention: in place on the f16 pages (native), else over
        their gathered, padded contexts in one SDPA call. q: (B, H, D) → (B, H * Dv)"""
        scale = self.config.attn_scale
        slabs = pool.f16_slabs(i)
        if slabs is not None:
            out = paged_decode_attention(q, *slabs, d.tables, d.lengths, scale, window)
            if out is not None:
                return out
        keys, values = pool.read(i, d.slots)  # (B*L, Hkv, D)
        return decode_attention(
            q,
            keys.unflatten(0, (-1, d.width)),
            values.unflatten(0, (-1, d.width)),
            d.mask(window),
            scale,
        )

    def _attend_triton(self, i, b: ForwardBatch, pool: KVPool, q, k, v, window):
        """A GPU layer's attention (f16 or q8_0 pages): the KV-write kernel, paged decode
        attention for the one-token sequences, SDPA over gathered pages for prefill chunks."""
        from kernels.triton.kv_write import kv_write
        from kernels.triton.paged_attention import paged_attention_decode

        k_pages, v_pages, k_scale, v_scale = pool.pages(i)
        kv_write(k, v, k_pages, v_pages, b.slots, k_scale, v_scale)
        d = b.decode
        if d is None:
            return self._attend_chunks(i, b, pool, q, window)
        only = not b.seqs  # decodes only: row b is sequence b, no gather or scatter
        att = paged_attention_decode(
            (q if only else q[d.rows]).contiguous(),
            k_pages,
            v_pages,
            d.tables,
            d.lengths,
            self.config.attn_scale,
            window,
            k_scale,
            v_scale,
        )  # (B, H, Dv)
        att = att.reshape(att.shape[0], -1)
        if only:
            return att
        out = self._attend_chunks(i, b, pool, q, window)
        out[d.rows] = att
        return out

    def _layers(self, tokens: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """Embeddings and every block: tokens (T,) at positions (T,) → hidden (T, E), on the
        head's device."""
        return self.blocks_forward(self.embed_rows(tokens), self.rope_tables(positions), attend)

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

    def blocks_forward(self, x: torch.Tensor, tables: dict, attend) -> torch.Tensor:
        """Every block on x (T, E) with rope tables from rope_tables → hidden (T, E) on the
        head's device. The hidden state moves only where consecutive layers' devices differ;
        on a model whose blocks and tables are all on the GPU already, nothing moves (and
        nothing here reads back to the host: the step can be captured in a CUDA graph)."""
        c = self.config
        on_device: dict = {}
        h = None  # the next block's normed input, when made together with its residual add
        for i, block in enumerate(self.blocks):
            swa = bool(c.swa_layers[i]) and bool(c.sliding_window)
            key = (block.device, swa)
            if key not in on_device:
                on_device[key] = tuple(cross(t, block.device) for t in tables[swa])
            rope = self.rope_swa if swa else self.rope
            window = c.sliding_window if c.swa_layers[i] else 0
            x = cross(x, block.device)
            if h is None:
                h = block.ops.rms_norm(x, block.attn_norm, c.rms_eps)
            x, f = self._block_forward(i, block, x, h, rope, on_device[key], window, attend)
            after = self.blocks[i + 1] if i + 1 < len(self.blocks) else None
            if after is not None and after.device == block.device:
                x, h = block.ops.add_rms_norm(x, f, after.attn_norm, c.rms_eps)
            else:
                x, h = x + f, None
        return cross(x, self.head_device)

    def decode_on_gpu(
        self,
        x: torch.Tensor,
        tables: dict,
        pool: KVPool,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
        with_head: bool,
    ) -> torch.Tensor:
        """One decode step of B sequences on a model whose blocks all run on the GPU, every
        input already there: x (B, E) embeddings, tables from rope_tables, slots (B,) where
        each new K/V goes (negative: a padding row, not written), block_tables (B, W) and
        lengths (B,) (context lengths, the new token included) → logits (B, V) with_head,
        else the final hidden state (B, E). Nothing here reads back to the host or depends on
        tensor values in Python, so runtime/decode_graph.py captures it as a CUDA graph."""
        from kernels.triton.kv_write import kv_write
        from kernels.triton.paged_attention import paged_attention_decode

        def attend(i, q, k, v, window):
            k_pages, v_pages, k_scale, v_scale = pool.pages(i)
            kv_write(k, v, k_pages, v_pages, slots, k_scale, v_scale)
            out = paged_attention_decode(
                q.contiguous(),
                k_pages,
                v_pages,
                block_tables,
                lengths,
                self.config.attn_scale,
                window,
                k_scale,
                v_scale,
            )
            return out.reshape(out.shape[0], -1)  # (B, H * Dv)

        x = self.blocks_forward(x, tables, attend)
        return self.logits(x) if with_head else x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states (R, E) → logits (R, V), on the head's device."""
        return self.head(self.head_ops.rms_norm(x, self.output_norm, self.config.rms_eps))

    def _block_forward(
        self, i, b: Block, x, h, rope, tables, window, attend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block on x (T, E) whose attention-normed form is h: → (x after the attention's
        residual add, the FFN's output f); the caller adds f (with the next block's norm)."""
        c, n, ops = self.config, x.shape[0], b.ops
        q, k, v = matmuls([b.q, b.k, b.v], h)
        q = q.view(n, c.n_head, c.head_dim)
        k = k.view(n, c.n_head_kv, c.head_dim)
        v = v.view(n, c.n_head_kv, c.head_dim_v)
        if b.q_norm is not None:
            q, k = ops.rms_norm(q, b.q_norm, c.rms_eps), ops.rms_norm(k, b.k_norm, c.rms_eps)
        q, k = ops.rope_qk(q, k, *tables, rope.neox)
        a = b.o(attend(i, q, k, v, window))  # (T, E)
        if b.post_attn_norm is not None:
            a = ops.rms_norm(a, b.post_attn_norm, c.rms_eps)
        x, h = ops.add_rms_norm(x, a, b.ffn_norm, c.rms_eps)
        gate, up = matmuls([b.gate, b.up], h)
        f = b.down(ops.act_mul(gate, up, gelu=c.activation == "gelu_tanh"))
        if b.post_ffn_norm is not None:
            f = ops.rms_norm(f, b.post_ffn_norm, c.rms_eps)
        return x, f
