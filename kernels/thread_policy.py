"""How a forward pass uses the CPU's threads.

The native matmul kernel runs on its own pool (workers claim chunks and never wait on each
other); torch's own ops (norms, rope, attention, activations) run as OpenMP teams that end in a
barrier. Both at once on the same cores contend: a pool worker still spinning after a matmul
holds the core an OpenMP thread needs, and each small op then waits for a time slice (2 threads
were measured no faster than 1: docs/kernels.md). So during a forward the matmuls get all the
threads and torch's ops get one.

Several models may run forwards at once (the server runs one engine thread per model), so the
toggles must not race. Under OpenMP torch's count is per thread, but torch.set_num_threads also
sets the count a thread takes at its first parallel op: a thread that starts while another
forward has lowered it would keep 1 for good. The native kernel's count is one process-wide
value. So: a lock and a count of forwards inside; the first records torch's count, every
entrant lowers and later restores only its own thread's count (a thread that picked up the
lowered count gets the recorded one), and the native count returns to "follow torch" only when
the last forward leaves. Two native calls at once never share the pool (the second runs its
job on its own thread), so one native count for all of them is enough.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kernels import native_loader

_lock = threading.Lock()
_inside = 0  # forwards inside forward_threads now, in all threads
_found = 0  # torch's count the first of them found (what a lowered thread should have)


@contextmanager
def forward_threads(threads: int = 0) -> Iterator[None]:
    """Within: native matmuls on `threads` threads (0: torch's configured count), torch's ops
    on one thread. Without the native kernel torch does the matmuls, on `threads` threads.
    Safe to enter from several threads at once (one engine per model)."""
    global _inside, _found
    module = native_loader.load() if native_loader.enabled() else None
    with _lock:
        configured = torch.get_num_threads()  # this thread's own count
        if _inside and configured == 1 and _found > 1:
            configured = _found  # taken while another forward had lowered it: not the user's
        if not _inside:
            _found = configured
        _inside += 1
        threads = threads or configured
        lower = module is not None and not (threads == 1 and configured == 1)
        if lower and module is not None:  # (lower implies a module; this tells the checker)
            module.set_num_threads(threads)
    try:
        if module is None:
            torch.set_num_threads(threads)
        elif lower:
            torch.set_num_threads(1)
        yield
    finally:
        if module is None or lower:
            torch.set_num_threads(configured)  # this thread only (and new threads' default)
        with _lock:
            _inside -= 1
            if not _inside:
                _found = 0
                if module is not None:
                    module.set_num_threads(0)
