"""What `tandem run` tells the user while it works: a spinner while the model loads (stderr,
on a terminal only), one startup line saying where the model runs, and a warning when a
CUDA GPU is present but this torch cannot use it (with the command that fixes it)."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
CUDA_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cu124"


@contextlib.contextmanager
def spinner(message: str, stream: TextIO | None = None) -> Iterator[None]:
    """A spinner and `message` on `stream` (stderr) while the block runs; nothing when the
    stream is not a terminal. The line is erased at the end."""
    out = stream or sys.stderr
    if not out.isatty():
        yield
        return
    done = threading.Event()

    def spin() -> None:
        for frame in itertools.cycle(FRAMES):
            out.write(f"\r{frame} {message}\x1b[K")
            out.flush()
            if done.wait(0.1):
                break
        out.write("\r\x1b[K")
        out.flush()

    thread = threading.Thread(target=spin, name="tandem-spinner", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def nvidia_gpu_present() -> bool:
    """An NVIDIA driver is loaded (whatever torch can see)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def cuda_warning(present: bool | None = None) -> str | None:
    """The warning for a GPU this torch cannot use, or None."""
    import torch

    if present is None:
        present = nvidia_gpu_present()
    if not present or torch.cuda.is_available():
        return None
    build = "CPU-only" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return (
        f"warning: an NVIDIA GPU is present but this torch ({torch.__version__}) is {build}, "
        f"so the model runs on the CPU. Install the CUDA build: {CUDA_TORCH} && "
        "pip install 'tandem[gpu]'"
    )


def placement_summary(devices, n_layer: int) -> str:
    """'30/30 layers on GPU', '12/30 layers on GPU, head on CPU' or 'CPU only'."""
    on_gpu = sum(1 for where in devices.layers if where == "gpu")
    if on_gpu == 0 and devices.head != "gpu":
        return "CPU only"
    return f"{on_gpu}/{n_layer} layers on GPU, head on {devices.head.upper()}"


def startup_line(llm) -> str:
    """One line: the model, its device, the placement, threads, kernel ISA, KV size."""
    import torch

    from kernels import native_loader
    from kernels.thread_policy import default_threads
    from runtime.placement.devices import format_size

    lm = llm.lm
    devices = lm.model.devices
    device = torch.cuda.get_device_name(devices.gpu) if devices.uses_gpu else "cpu"
    threads = lm.options.num_thread or default_threads()
    built = native_loader._modules.get(native_loader.chosen_isa())
    isa = native_loader.chosen_isa() if built is not None else "torch (no native kernel)"
    runner = llm.engine.runner
    return (
        f"{lm.name}: {device}, {placement_summary(devices, lm.config.n_layer)}, "
        f"{threads} threads, kernel {isa}, KV {format_size(runner.kv_bytes)} "
        f"{lm.options.kv_cache_type} for {llm.num_ctx} tokens (loaded in {lm.load_seconds:.1f}s)"
    )


def quiet_environment() -> bool:
    """TANDEM_QUIET=1 leaves the startup line out (scripts that parse stderr)."""
    return os.environ.get("TANDEM_QUIET", "") not in ("", "0")
