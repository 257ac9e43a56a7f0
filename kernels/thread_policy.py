"""How a forward pass uses the CPU's threads.

The native matmul kernel runs on its own pool (workers claim chunks and never wait on each
other); torch's own ops (norms, rope, attention, activations) run as OpenMP teams that end in a
barrier. Both at once on the same cores contend: a pool worker still spinning after a matmul
holds the core an OpenMP thread needs, and each small op then waits for a time slice. Measured
on this project's 2-core VM (tandem bench smollm2 -t 2): decode 45 tok/s at 2 threads, no faster
than at 1. So during a forward the matmuls get all the threads and torch's ops get one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kernels import native_loader


@contextmanager
def forward_threads() -> Iterator[None]:
    """Within: native matmuls on torch's configured thread count, torch's ops on one thread.
    Without the native kernel (torch does the matmuls), nothing changes."""
    module = native_loader.load() if native_loader.enabled() else None
    threads = torch.get_num_threads()
    if module is None or threads == 1:
        yield
        return
    module.set_num_threads(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        module.set_num_threads(0)
