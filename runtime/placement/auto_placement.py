"""auto_placement: the Placement a load uses when the user names no device map — the
planner's choice on a machine with CUDA, everything on the CPU without one.

    LoadedModel.load(ref, options=run_options)     # plans with options.plan_request()
    planned(PlanRequest(num_ctx=..., num_gpu=-1))  # the same, for a request built by hand

Without CUDA nothing is measured or planned (loading stays as fast as before); asking for
GPU layers there only logs that they run on the CPU, while a GPU pin (`pin PATTERN=gpu`) is
refused: it names tensors that must be on a GPU. With CUDA the planner (runtime/placement/planner.py)
places layers, head and KV to maximise predicted decode speed within free VRAM, honouring
num_gpu, gpu_memory and pins; a plan that cannot fit raises PlanError before any allocation.
"""

from __future__ import annotations

import logging

import torch

from loaders.config import ModelConfig
from loaders.gguf_file import GGUFFile
from modelfiles.parameters import default
from quant.errors import PlanError
from runtime.placement.device_map import DeviceMap
from runtime.placement.planner import PlanRequest

log = logging.getLogger(__name__)


def planned(request: PlanRequest):
    """→ placement(gguf, config) → DeviceMap, for LoadedModel.load."""

    def placement(gguf: GGUFFile, config: ModelConfig) -> DeviceMap:
        if not torch.cuda.is_available() and request.gpu_pins:
            raise PlanError(
                f"pin {request.gpu_pins[0]}=gpu asks for the GPU but there is no CUDA "
                "device here; pin it to cpu or remove the pin"
            )
        if request.num_gpu == 0 and not request.gpu_pins or not torch.cuda.is_available():
            if request.num_gpu > 0:
                log.warning(
                    "num_gpu=%d asks for GPU layers but there is no CUDA device; "
                    "every layer runs on the CPU",
                    request.num_gpu,
                )
            return DeviceMap.cpu_only(config.n_layer)
        from runtime.placement.devices import detect
        from runtime.placement.model_sizes import ModelSizes
        from runtime.placement.planner import plan

        chosen = plan(ModelSizes.from_tensors(config, gguf.tensors), detect(), request)
        devices = DeviceMap.from_placement(chosen.placement)
        log.info(
            "placement: %s (predicted decode %.1f tok/s)",
            devices.describe(),
            chosen.decode.tokens_per_s,
        )
        return devices

    return placement


def auto_placement(
    num_ctx: int,
    num_parallel: int = 1,
    num_gpu: int = default("num_gpu"),
    gpu_memory: int | None = None,
    pins: tuple[str, ...] = (),
    kv_type: str = default("kv_cache_type"),
    gpu_pins: tuple[str, ...] = (),
):
    """planned() for a request given field by field."""
    return planned(
        PlanRequest(
            num_ctx=num_ctx,
            num_parallel=num_parallel,
            num_gpu=num_gpu,
            gpu_memory=gpu_memory,
            pins=tuple(pins),
            gpu_pins=tuple(gpu_pins),
            kv_type=kv_type,
        )
    )
