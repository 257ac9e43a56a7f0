"""DeviceMap: where each part of a model runs — every weight tensor, each layer's
activations and KV pages, and the output head — as "cpu" or "gpu".

A layer computes where its KV lives; a weight pinned elsewhere (a tensor-pattern pin, or a
layer whose weights are on the GPU but whose KV stayed in RAM) receives its input there and
returns its output to the layer's device. The GPU is `gpu`: cuda:0 when there is one; on a
machine without CUDA the "gpu" parts run Triton's kernels in its CPU interpreter on CPU
tensors (tests and CI), so every path of a hybrid forward can run anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GPU, CPU = "gpu", "cpu"


def gpu_device() -> torch.device:
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class DeviceMap:
    tensors: dict[str, str]  # tensor name → GPU | CPU (absent: CPU)
    layers: tuple[str, ...]  # per layer: where its activations and KV live
    head: str  # output norm and head
    gpu: torch.device

    @classmethod
    def cpu_only(cls, n_layer: int) -> DeviceMap:
        return cls({}, (CPU,) * n_layer, CPU, gpu_device())

    @classmethod
    def from_placement(cls, placement, gpu: torch.device | None = None) -> DeviceMap:
        """From the planner's Placement (runtime.placement.plan_cost): tensors, head, kv per layer."""
        return cls(
            dict(placement.tensors), tuple(placement.kv), placement.head, gpu or gpu_device()
        )

    @classmethod
    def last_layers(
        cls,
        tensor_names,
        n_layer: int,
        n_gpu: int,
        head_gpu: bool = False,
        gpu: torch.device | None = None,
    ) -> DeviceMap:
        """The last n_gpu layers (weights and KV) on the GPU, as llama.cpp's -ngl does."""
        first = n_layer - n_gpu
        tensors = {
            name: GPU
            for name in tensor_names
            if name.startswith("blk.") and int(name.split(".")[1]) >= first
        }
        layers = tuple(GPU if i >= first else CPU for i in range(n_layer))
        return cls(tensors, layers, GPU if head_gpu else CPU, gpu or gpu_device())

    @property
    def uses_gpu(self) -> bool:
        return GPU in self.layers or self.head == GPU or GPU in self.tensors.values()

    def device(self, where: str) -> torch.device:
        return self.gpu if where == GPU else torch.device("cpu")

    def of_tensor(self, name: str) -> str:
        return self.tensors.get(name, CPU)

    def fewer_gpu_layers(self) -> DeviceMap | None:
        """The same map with the first half of its GPU layers (weights and KV) moved to the
        CPU, and the head too once no layer is left there; None when nothing is on the GPU."""
        gpu_layers = [i for i, w in enumerate(self.layers) if w == GPU]
        if not self.uses_gpu:
            return None
        moved = set(gpu_layers[: max(1, len(gpu_layers) // 2)]) if gpu_layers else set()
        layers = tuple(CPU if i in moved else w for i, w in enumerate(self.layers))
        tensors = {n: (CPU if _layer_of(n) in moved else w) for n, w in self.tensors.items()}
        head = self.head if GPU in layers else CPU
        if GPU not in layers:
            tensors = dict.fromkeys(tensors, CPU)
        return DeviceMap(tensors, layers, head, self.gpu)

    def describe(self) -> str:
        """ollama's PROCESSOR column: "100% CPU", "100% GPU" or "40%/60% CPU/GPU" by layers."""
        n = len(self.layers)
        gpu = sum(w == GPU for w in self.layers)
        if gpu == 0:
            return "100% CPU"
        if gpu == n:
            return "100% GPU"
        share = round(100 * gpu / n)
        return f"{100 - share}%/{share}% CPU/GPU"


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() else None
