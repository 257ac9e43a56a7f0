"""The native CPU kernels (kernels/native/: qmatmul.cpp, interleaved.cpp, small_ops.cpp,
paged_attention.cpp, moe.cpp, moe_ffn.cpp, delta_rule.cpp,
short_conv.cpp), one extension module built on first use, loaded once.

`qmatmul(x, w, ggml_type)` computes x · Wᵀ for W in packed GGML rows with llama.cpp's CPU
numerics (activations quantized to the type's vec_dot type, integer block dot products; see
the .cpp's header). It is built through `torch.utils.cpp_extension.load` the first time a
process asks for it (about a minute; later processes reuse the cached build), under
TANDEM_BUILD_CACHE or $TANDEM_HOME/build (TANDEM_HOME defaults to ~/.tandem).

One build per instruction set, named after it so builds for different CPUs never collide in
a shared cache: "avx512vnni" (the AVX2 code with VNNI dot products, when the CPU has
AVX512-VNNI/VL/BW), "avx2" (-mavx2 -mfma -mf16c, when the CPU has all three) or "scalar"
(portable C++); never -march=native, whose build would crash on an older CPU sharing the
cache. A build that fails falls back to the next one down.

Threads during a forward pass: see kernels/thread_policy.py (matmuls get them all).

Where the build fails (no compiler, no ninja) one warning is logged and `available()` is
False: callers keep the torch dequantize-and-matmul path. TANDEM_NATIVE=0 disables the kernel;
TANDEM_NATIVE_ISA=avx2 (or scalar) picks a lower build than the CPU's best.

Threads (torch.get_num_threads() of them): the kernel's own small pool, not OpenMP, whose
closing barrier waits for a thread the OS has parked on a busy machine. The pool's caller
never waits for a worker that has not started (it only waits for chunks a worker has
claimed), so a call runs at about one-thread speed at worst. The measurements behind this:
docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

NATIVE = Path(__file__).resolve().parent / "native"
SOURCES = (
    NATIVE / "qmatmul.cpp",
    NATIVE / "interleaved.cpp",
    NATIVE / "small_ops.cpp",
    NATIVE / "paged_attention.cpp",
    NATIVE / "moe.cpp",
    NATIVE / "moe_ffn.cpp",
    NATIVE / "delta_rule.cpp",
    NATIVE / "short_conv.cpp",
)
HEADERS = (NATIVE / "common.h",)
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
ISA_FLAGS = {
    "avx512vnni": AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
    "avx2": AVX2_FLAGS,
    "scalar": [],
}
FALLBACK = {"avx512vnni": "avx2", "avx2": "scalar"}  # when a build fails, the next one down
COMMON_FLAGS = ["-O3", "-fno-math-errno"]

_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}  # isa → loaded module, or None once a build failed


def enabled() -> bool:
    """False when the environment turns the native kernel off (TANDEM_NATIVE=0)."""
    return os.environ.get("TANDEM_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def cpu_isa() -> str:
    """The best build this CPU can run: "avx512vnni" (AVX2 code with VNNI dot products),
    "avx2" (with FMA and F16C) or "scalar"."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "scalar"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    if not {"avx2", "fma", "f16c"} <= flags:
                        return "scalar"
                    vnni = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
                    return "avx512vnni" if vnni else "avx2"
    except OSError:
        pass
    # No /proc/cpuinfo: every AVX2 CPU also has FMA and F16C.
    capability = torch.backends.cpu.get_cpu_capability()
    return "avx2" if capability in ("AVX2", "AVX512") else "scalar"


ORDER = ("scalar", "avx2", "avx512vnni")  # each runs wherever the next one up does


def chosen_isa() -> str:
    """The build to use: this CPU's best, or TANDEM_NATIVE_ISA (scalar, avx2) to measure or
    debug a lower one; a build above what the CPU runs is refused with a warning."""
    best, wanted = cpu_isa(), os.environ.get("TANDEM_NATIVE_ISA", "").strip().lower()
    if not wanted:
        return best
    if wanted not in ORDER:
        log.warning(
            "TANDEM_NATIVE_ISA=%s is not one of %s; using %s", wanted, ", ".join(ORDER), best
        )
        return best
    if ORDER.index(wanted) > ORDER.index(best):
        log.warning("TANDEM_NATIVE_ISA=%s: this CPU runs at most %s; using that", wanted, best)
        return best
    return wanted


def _build_dir(name: str) -> str:
    """Where the extension is built: TANDEM_BUILD_CACHE, else TANDEM_HOME/build (default
    ~/.tandem), per Python and torch version, so one cache serves every model and process of
    this install (the tests point every temporary TANDEM_HOME at one cache this way)."""
    home = Path(os.environ.get("TANDEM_HOME") or Path.home() / ".tandem").expanduser()
    cache = Path(os.environ.get("TANDEM_BUILD_CACHE") or home / "build").expanduser()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    path = cache / "torch_extensions" / tag.replace("+", "_") / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@contextlib.contextmanager
def _build_lock(build_dir: str) -> Iterator[None]:
    """One build at a time across processes, by an flock the kernel drops when its holder
    dies. torch's own marker (`lock` in the build directory, a file that exists while a build
    runs) outlives a killed build and then makes every later process wait on it forever;
    holding the flock proves no live tandem process is building, so a marker found then is
    stale and removed."""
    with open(Path(build_dir) / "tandem.flock", "a+") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # said, or the wait looks like a hang
            log.info("waiting for another process to finish building tandem's CPU kernel")
            fcntl.flock(held, fcntl.LOCK_EX)
        try:
            stale = Path(build_dir) / "lock"
            if stale.exists():
                log.warning("removing a stale build lock left by a killed build: %s", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def _build(isa: str) -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    flags = COMMON_FLAGS + ISA_FLAGS[isa]
    code = b"".join(src.read_bytes() for src in SOURCES + HEADERS)
    # ninja's build file names the sources by path: two checkouts of the same sources sharing
    # one cache would each see the other's build as stale and rebuild it in turn, so the
    # sources' directory is part of the name too
    where = str(SOURCES[0].resolve().parent).encode()
    digest = hashlib.sha256(code + " ".join(flags).encode() + where).hexdigest()[:10]
    name = f"tandem_qmatmul_{isa}_{digest}"  # a new name (and build) per source, flags, place
    start, build_dir = time.perf_counter(), _build_dir(name)
    if _stale(Path(build_dir) / f"{name}.so"):
        log.info("building tandem's CPU kernel %s (once; about a minute)", name)
    with _build_lock(build_dir):
        module = load_extension(
            name=name,
            sources=[str(src) for src in SOURCES],
            extra_cflags=flags,
            build_directory=build_dir,
            verbose=False,
        )
    assert isinstance(module, ModuleType)  # is_python_module=True (the default): not a path
    log.debug("native qmatmul %s ready in %.1f s", name, time.perf_counter() - start)
    return module


def _stale(so: Path) -> bool:
    """The build will compile: no .so yet, or a source newer than it (ninja rebuilds then)."""
    if not so.exists():
        return True
    built = so.stat().st_mtime
    return any(src.stat().st_mtime > built for src in SOURCES + HEADERS)


def _build_or_warn(isa: str) -> ModuleType | None:
    try:
        return _build(isa)
    except Exception as e:  # no compiler, no ninja, a broken toolchain: fall back
        lines = str(e).strip().splitlines()
        log.warning(
            "native CPU kernel unavailable (%s build failed: %s); using the torch dequantize path",
            isa,
            lines[-1] if lines else type(e).__name__,
        )
        return None


def load(isa: str | None = None) -> ModuleType | None:
    """The extension module for `isa` (default: this CPU's best build that compiles here,
    trying the next one down when a build fails), built on first use; None when it cannot be
    built (one warning is logged per ISA). Thread-safe."""
    if isa is None:
        isa = chosen_isa()
        while load(isa) is None and isa in FALLBACK:
            isa = FALLBACK[isa]
        return load(isa)
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown ISA {isa!r}; one of {sorted(ISA_FLAGS)}")
    if isa in _modules:
        return _modules[isa]
    with _lock:
        if isa not in _modules:
            _modules[isa] = _build_or_warn(isa)
    return _modules[isa]


def available() -> bool:
    """Whether the native kernel is enabled and built (building it if this is the first ask)."""
    return enabled() and load() is not None


def supports(ggml_type: int) -> bool:
    """Whether qmatmul handles weights of `ggml_type` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
    Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) here: the kernel is available and has that type."""
    module = load() if enabled() else None
    return module is not None and bool(module.supports(int(ggml_type)))


def qmatmul(x: torch.Tensor, w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """y = x · Wᵀ: x (M, K) float32, w (N, row_bytes) uint8 rows of GGML blocks → (M, N)
    float32. Raises RuntimeError where the kernel is unavailable (check `supports` first)."""
    module = load() if enabled() else None
    if module is None:
        raise RuntimeError(
            "the native qmatmul kernel is unavailable (TANDEM_NATIVE=0 or the "
            "build failed; see the logged warning)"
        )
    return module.qmatmul(x, w, int(ggml_type))
