"""Splitting a GGUF into a set the way llama.cpp does, with gguf-py's own writer
(GGUFWriter(split_max_tensors=N), which convert_hf_to_gguf.py --split-max-tensors uses): the
first shard holds the metadata, every shard split.no / split.count / split.tensors.count."""

from __future__ import annotations

from pathlib import Path

import gguf

from loaders.gguf_file import GGUFFile
from modelfiles.gguf_merge import copy_metadata, write_tensors


def split_gguf(src: Path, stem: Path, max_tensors: int) -> list[Path]:
    """Write `src` as `<stem>-0000i-of-0000N.gguf` shards; returns their paths in order."""
    with GGUFFile(src) as source:
        writer = gguf.GGUFWriter(
            str(stem) + ".gguf",
            source.metadata["general.architecture"],
            split_max_tensors=max_tensors,
        )
        copy_metadata(source, writer, ("general.architecture", "general.alignment"))
        write_tensors([source], writer)
    return sorted(stem.parent.glob(f"{stem.name}-*-of-*.gguf"))
