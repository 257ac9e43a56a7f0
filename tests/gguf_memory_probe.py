"""Run as a script: load each GGUF given as far as LoadedModel.load goes before building
weights (GGUFFile, ModelConfig with its tensor checks, Tokenizer) and print one JSON line per
file: the resident-memory peak that load added (VmHWM after − VmRSS before, the peak reset
per file through /proc/self/clear_refs) and the typed error, if any. Linux only."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path


def _status(field: str) -> int:
    """A /proc/self/status figure, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def load(path: Path) -> str | None:
    from loaders.config import ModelConfig
    from loaders.gguf_file import GGUFFile
    from loaders.tokenizer import Tokenizer
    from quant.errors import TandemError

    try:
        with GGUFFile(path) as f:
            ModelConfig.from_metadata(f.metadata, f.tensors.keys())
            Tokenizer.from_metadata(f.metadata)
    except TandemError as e:
        return f"{type(e).__name__}: {e}"
    return None


def main() -> None:
    import loaders.config  # noqa: F401  (imports are not the load's memory)
    import loaders.gguf_file  # noqa: F401
    import loaders.tokenizer  # noqa: F401

    for arg in sys.argv[1:]:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
        before = _status("VmRSS")
        error = load(Path(arg))
        peak = _status("VmHWM") - before
        print(
            json.dumps(
                {"path": arg, "peak": peak, "size": Path(arg).stat().st_size, "error": error}
            )
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
