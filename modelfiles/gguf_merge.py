"""Merging a split GGUF set (`NAME-00001-of-0000N.gguf`, as llama.cpp's gguf-split writes it)
into one GGUF blob, because tandem's loader maps one file per model.

The set's layout (llama.cpp llama-arch.cpp LLM_KV_SPLIT_*, gguf-split.cpp): every shard is a
GGUF of its own holding `split.no` (0-based), `split.count` and `split.tensors.count`; the first
shard also holds all the model's metadata; the tensors are spread over the shards in order.
The merged file has the first shard's metadata without the split.* keys and every tensor, bytes
unchanged, in shard order. Shards that do not form one set are refused, saying why.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFValueType as VT

from loaders.blobs import partial
from loaders.gguf_arrays import NumericArray, StringArray
from loaders.gguf_file import GGUFFile
from modelfiles.manifest import Layer
from modelfiles.store import Store
from quant.errors import GGUFError

SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_SKIP = ("general.architecture", "general.alignment", *SPLIT_KEYS)


def merge_split(store: Store, shards: list[Path]) -> Path:
    """Write the merged GGUF of `shards` (in order) into the blob store; returns its blob."""
    with partial(store.blobs, "merge-") as (out, tmp):
        out.close()
        merge_into(shards, tmp)
        layer: Layer = store.adopt(tmp)
    return store.blob_path(layer)


def merge_into(shards: list[Path], dst: Path) -> None:
    files = [GGUFFile(p) for p in shards]
    try:
        _check_set(files, shards)
        first = files[0]
        writer = gguf.GGUFWriter(str(dst), first.metadata["general.architecture"])
        if first.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
            writer.add_custom_alignment(first.alignment)
        copy_metadata(first, writer, _SKIP)
        write_tensors(files, writer)
    finally:
        for f in files:
            f.close()


def write_tensors(files: list[GGUFFile], writer: gguf.GGUFWriter) -> None:
    """Every tensor of `files`, in order, bytes unchanged; then the file is complete."""
    for f in files:
        for info in f.tensors.values():
            nbytes = int(f.tensor_bytes(info.name).numel())
            # the shape in elements, outermost first (a non-uint8 dtype keeps gguf-py from
            # reading it as a shape in bytes)
            writer.add_tensor_info(
                info.name,
                list(reversed(info.shape)),
                np.dtype(np.float32),
                nbytes,
                raw_dtype=gguf.GGMLQuantizationType(info.ggml_type),
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for f in files:
        for info in f.tensors.values():
            writer.write_tensor_data(f.tensor_bytes(info.name).numpy())
    writer.close()


def copy_metadata(source: GGUFFile, writer: gguf.GGUFWriter, skip: tuple[str, ...]) -> None:
    """Every key but `skip`, with its type (an array's item type from its values)."""
    for key, value in source.metadata.items():
        if key in skip:
            continue
        vtype = source.metadata_types[key]
        if vtype != VT.ARRAY:
            writer.add_key_value(key, value, vtype)
        elif len(value):  # gguf-py cannot write an empty array
            writer.add_key_value(key, value, VT.ARRAY, sub_type=_item_type(key, value))


def _item_type(key: str, value: object) -> VT:
    if isinstance(value, StringArray):
        return VT.STRING
    if isinstance(value, NumericArray):
        kind = value.values.dtype
        if kind == np.bool_:
            return VT.BOOL
        return _NUMERIC[kind.str.lstrip("<>=|")]
    raise GGUFError(f"metadata {key!r} is a nested array, which merging does not copy")


_NUMERIC = {
    "u1": VT.UINT8,
    "i1": VT.INT8,
    "u2": VT.UINT16,
    "i2": VT.INT16,
    "u4": VT.UINT32,
    "i4": VT.INT32,
    "u8": VT.UINT64,
    "i8": VT.INT64,
    "f4": VT.FLOAT32,
    "f8": VT.FLOAT64,
}


def _check_set(files: list[GGUFFile], shards: list[Path]) -> None:
    count = len(files)
    total = sum(len(f.tensors) for f in files)
    for i, (f, path) in enumerate(zip(files, shards, strict=True)):
        md = f.metadata
        if md.get("split.no") != i or md.get("split.count") != count:
            raise GGUFError(
                f"{path.name} is not shard {i + 1} of {count} (its split.no is "
                f"{md.get('split.no')!r}, split.count {md.get('split.count')!r}); the split "
                "files do not form one set"
            )
    declared = files[0].metadata.get("split.tensors.count")
    if declared != total:
        raise GGUFError(
            f"the split set declares {declared!r} tensors but its {count} files hold {total}"
        )
    if "general.architecture" not in files[0].metadata:
        raise GGUFError(f"{shards[0].name}, the first split file, has no general.architecture")
