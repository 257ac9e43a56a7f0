"""How tandem uses the CPU's threads.

The native matmul kernel runs on its own pool (workers claim chunks and never wait on each
other); torch's own ops (norms, rope, attention, activations, the sampler's softmax and top-k)
run as OpenMP teams that end in a barrier. Both on the same cores contend: a pool worker still
spinning after a matmul holds the core an OpenMP thread needs, an OpenMP worker spinning after
a team holds the core a pool worker needs, and each waits for a time slice (docs/kernels.md).

So while the native kernel does the matmuls, torch's ops run on one thread, for good: a thread
that runs a forward leaves torch at one thread (torch.set_num_threads also makes that the count
of threads started later). An earlier policy lowered torch only inside a forward and restored
it after; the sampler's ops between forwards then ran as two-thread teams, and on a busy 2-core
machine decode in process was 2-3x slower than with torch at one thread throughout (SmolLM2,
scripts/bench_engine.py -t 2: 19-20 vs 42-44 tok/s at 1 sequence, 105-113 vs 335-388 at 16).

The forward's thread count (a model's num_thread, else `default_threads()`: torch's count as
configured before tandem lowered it, recorded on first use) goes to the native pool, a
process-wide value set on entering each forward. Without the native kernel torch does the
matmuls, on that many threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kernels import native_loader

_lock = threading.Lock()
_default: int | None = None  # torch's configured count, recorded before tandem lowered it


def default_threads() -> int:
    """The threads a forward uses when its model sets none: torch's intra-op count as the
    process configured it (OMP_NUM_THREADS, torch.set_num_threads), recorded the first time
    this is asked (tandem lowers torch's own count afterwards)."""
    global _default
    with _lock:
        if _default is None:
            _default = torch.get_num_threads()
        return _default


@contextmanager
def forward_threads(threads: int = 0) -> Iterator[None]:
    """Within: native matmuls on `threads` threads (0: default_threads()); torch's ops on one
    thread, left so afterwards. Without the native kernel torch does the matmuls, on `threads`
    threads (also left so). Safe to enter from several threads at once."""
    threads = threads or default_threads()
    module = native_loader.load() if native_loader.enabled() else None
    want = 1 if module is not None else threads
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    if module is not None:
        module.set_num_threads(threads)
    yield
