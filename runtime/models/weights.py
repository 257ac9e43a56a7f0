"""WeightLoader: a model's tensors read from its GGUF file onto their devices, once.

Weights stay packed (no dequantized model). CPU linears read 16-row panels re-laid out once
per file (kernels/linear.py), or, where the build has no panel kernel for the type (or for a
lookup-only embedding), a copy of the GGML rows; GPU linears are Triton's, copied to the
device (stacked where several read one input). Norms and biases are small float32 tensors.

Nothing the model keeps is a view of the file's mapping: every tensor is copied, one at a
time (the mapped pages of a tensor are released once its copy exists), so that after load
the mapping can be closed and a file truncated under a running model cannot fault it
(SIGBUS). Copies of the file's tensors are made once per GGUFFile (`GGUFFile.derived`) and
shared by every model loaded from it.
"""

from __future__ import annotations

import torch

from kernels.experts import PackedExperts, interleave_experts
from kernels.linear import PackedLinear, interleave
from kernels.triton_linear import TritonLinear
from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile, TensorInfo
from quant.dequant import dequantize
from quant.errors import GGUFError
from runtime.placement.device_map import GPU, DeviceMap


class WeightLoader:
    def __init__(self, gguf: GGUFFile, config: ModelConfig, devices: DeviceMap) -> None:
        self.gguf, self.config, self.devices = gguf, config, devices

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.gguf.tensors:
            raise GGUFError(
                f"{self.gguf.path.name}: tensor '{name}' is missing for a {self.config.arch} model"
            )
        return self.gguf.tensors[name]

    def linear(
        self, name: str, bias: str | None = None, where: str | None = None, panels: bool = True
    ) -> PackedLinear | TritonLinear:
        """A packed weight on its device (default: where the DeviceMap puts `name`): Triton's
        on the GPU; on the CPU the native path, over 16-row panels unless `panels` is False
        (a lookup-only embedding) or the build has no panel kernel for the type."""
        info = self.info(name)
        where = where or self.devices.of_tensor(name)
        device = self.devices.device(where)
        b = self.vector(bias, device) if bias and self.has(bias) else None
        if where == GPU:
            return TritonLinear(self._rows(name, device), info.ggml_type, info.shape[0], b, device)
        made = self.gguf.derived(("panels", name), lambda: self._panels(name)) if panels else None
        # With panels the GGML rows are never read again: a meta tensor keeps their shape.
        weight = self._meta(name) if made is not None else self._owned(name)
        return PackedLinear(weight, info.ggml_type, info.shape[0], b, panels=made)

    def linears(self, names: list[str], biases: list[str | None]) -> list:
        """The linears of `names`, which read one input (q/k/v; gate/up): stacked into one
        device weight when all are on the GPU with one type and width (and all or none
        biased), so that they run as one launch; else one by one."""
        infos = [self.info(n) for n in names]
        biased = [b is not None and self.has(b) for b in biases]
        if (
            all(self.devices.of_tensor(n) == GPU for n in names)
            and len(set(biased)) == 1
            and len({(i.ggml_type, i.shape[0]) for i in infos}) == 1
        ):
            device = self.devices.device(GPU)
            return TritonLinear.stacked(  # torch.cat copies the rows out of the mapping
                [self.gguf.tensor(n) for n in names],
                infos[0].ggml_type,
                infos[0].shape[0],
                [
                    self.vector(b, device) if on and b is not None else None
                    for b, on in zip(biases, biased, strict=True)
                ],
                device,
            )
        return [self.linear(n, b) for n, b in zip(names, biases, strict=True)]

    def split(self, name: str, sizes: list[int], bias: str | None = None) -> list:
        """The linears over consecutive row ranges of one fused tensor (phi3's attn_qkv → q,
        k, v; its ffn_up → gate, up): rows are whole output features, so each part is a
        packed weight of its own (stacked again into one launch on the GPU)."""
        info = self.info(name)
        if sum(sizes) != info.n_rows:
            raise GGUFError(
                f"{self.gguf.path.name}: tensor '{name}' has {info.n_rows} rows, not the "
                f"{' + '.join(map(str, sizes))} its parts need"
            )
        where = self.devices.of_tensor(name)
        device = self.devices.device(where)
        b = self.vector(bias, device) if bias and self.has(bias) else None
        biases: list[torch.Tensor | None] = (
            list(b.split(sizes)) if b is not None else [None] * len(sizes)
        )
        parts = list(self.gguf.tensor(name).split(sizes))  # (N_i, row_bytes) views
        if where == GPU:  # torch.cat copies the rows out of the mapping
            return TritonLinear.stacked(parts, info.ggml_type, info.shape[0], biases, device)
        out = []
        for j, part in enumerate(parts):
            made = self.gguf.derived(
                ("panels", name, j), lambda part=part: interleave(part, info.ggml_type)
            )
            weight = (
                torch.empty(part.shape, dtype=torch.uint8, device="meta")
                if made is not None
                else self.gguf.derived(("rows", name, j), part.clone)
            )
            out.append(PackedLinear(weight, info.ggml_type, info.shape[0], biases[j], panels=made))
        self.gguf.release_pages(name)
        return out

    def experts(self, name: str, bias: str | None = None) -> PackedExperts:
        """A mixture-of-experts weight (GGUF shape (K, N, E)) as (E, N, row_bytes) packed
        rows, expert by expert contiguous, on the device the DeviceMap puts `name`; its bias
        (N, E) as (E, N) float32 where the file has one."""
        info = self.info(name)
        if len(info.shape) != 3:
            raise GGUFError(f"tensor '{name}' has shape {list(info.shape)}; experts need 3 dims")
        k, n, e = info.shape[:3]
        where = self.devices.of_tensor(name)
        device = self.devices.device(where)
        b = self.vector(bias, device).view(e, n) if bias and self.has(bias) else None
        if where != GPU:
            mapped = self.gguf.tensor(name).view(e, n, info.row_bytes)
            panels = self.gguf.derived(
                ("panels", name), lambda: interleave_experts(mapped, info.ggml_type)
            )
            if panels is not None:  # the panels are the copy that is read from now on
                self.gguf.release_pages(name)
                meta = torch.empty(mapped.shape, dtype=torch.uint8, device="meta")
                return PackedExperts(meta, info.ggml_type, k, b, panels=panels)
        rows = self._owned(name).view(e, n, info.row_bytes)
        return PackedExperts(rows.to(device), info.ggml_type, k, b, triton=where == GPU)

    def vector(self, name: str, device: torch.device) -> torch.Tensor:
        """A norm's or bias's values, float32 (N,), in memory of its own on `device`."""
        info = self.info(name)
        values = dequantize(self.gguf.tensor(name), info.ggml_type).reshape(-1)
        return values.to(device, copy=True)  # F32 dequantizes to a view of the mapping

    # ---- copies out of the mapping -------------------------------------------------
    def _panels(self, name: str) -> torch.Tensor | None:
        made = interleave(self.gguf.tensor(name), self.info(name).ggml_type)
        if made is not None:
            self.gguf.release_pages(name)  # the panels are the copy that is read from now on
        return made

    def _owned(self, name: str) -> torch.Tensor:
        """The GGML rows (n_rows, row_bytes) uint8, copied once per file."""

        def copy() -> torch.Tensor:
            rows = self.gguf.tensor(name).clone()
            self.gguf.release_pages(name)
            return rows

        return self.gguf.derived(("rows", name), copy)

    def _rows(self, name: str, device: torch.device) -> torch.Tensor:
        """The rows for a device weight: the mapping's view where the move to `device`
        copies them, else (Triton's interpreter on CPU tensors) the owned copy."""
        return self.gguf.tensor(name) if device.type != "cpu" else self._owned(name)

    def _meta(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return torch.empty(info.n_rows, info.row_bytes, dtype=torch.uint8, device="meta")
