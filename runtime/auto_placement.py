"""auto_placement: the Placement a load uses when the user names no device map — the
planner's choice on a machine with CUDA, everything on the CPU without one.

    LoadedModel.load(ref, auto_placement(num_ctx=4096, num_parallel=4, num_gpu=-1))

Without CUDA nothing is measured or planned (loading stays as fast as before); asking for
GPU layers there only logs that they run on the CPU. With CUDA the planner (runtime/planner.py)
places layers, head and KV to maximise predicted decode speed within free VRAM, honouring
num_gpu, gpu_memory and pins; a plan that cannot fit raises PlanError before any allocation.
"""

from __future__ import annotations

import logging

import torch

from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from runtime.device_map import DeviceMap

log = logging.getLogger(__name__)


def auto_placement(
    num_ctx: int,
    num_parallel: int = 1,
    num_gpu: int = -1,
    gpu_memory: int | None = None,
    pins: tuple[str, ...] = (),
    kv_type: str = "f16",
):
    """→ placement(gguf, config) → DeviceMap, for LoadedModel.load."""

    def placement(gguf: GGUFFile, config: ModelConfig) -> DeviceMap:
        if num_gpu == 0 or not torch.cuda.is_available():
            if num_gpu > 0:
                log.warning(
                    "num_gpu=%d asks for GPU layers but there is no CUDA device; "
                    "every layer runs on the CPU",
                    num_gpu,
                )
            return DeviceMap.cpu_only(config.n_layer)
        from runtime.devices import detect
        from runtime.model_sizes import ModelSizes
        from runtime.planner import PlanRequest, plan

        request = PlanRequest(
            num_ctx=num_ctx,
            num_parallel=num_parallel,
            num_gpu=num_gpu,
            gpu_memory=gpu_memory,
            pins=tuple(pins),
            kv_type=kv_type,
        )
        chosen = plan(ModelSizes.from_tensors(config, gguf.tensors), detect(), request)
        devices = DeviceMap.from_placement(chosen.placement)
        log.info(
            "placement: %s (predicted decode %.1f tok/s)",
            devices.describe(),
            chosen.decode.tokens_per_s,
        )
        return devices

    return placement
