"""GGUF metadata arrays kept compact: a numeric array as one read-only numpy array, a string
array as the file's own bytes plus one offset per item (a Python list of a million ints or
strings costs 10-50x the file's bytes). Both are read-only Sequences of plain Python values,
equal to the list they stand for."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class GGUFArray(Sequence):
    """A read-only, compact GGUF metadata array; items are plain Python values."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]  # compared by value, like a list

    def tolist(self) -> list:
        return list(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (str, bytes)) or not isinstance(other, (Sequence, np.ndarray)):
            return NotImplemented
        if len(self) != len(other):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    def __repr__(self) -> str:
        head = ", ".join(repr(v) for v in self[:4])
        more = f", ... ({len(self)} items)" if len(self) > 4 else ""
        return f"{type(self).__name__}([{head}{more}])"


class NumericArray(GGUFArray):
    """A numeric (or bool) array: one read-only numpy array, `.values`."""

    __slots__ = ("values",)

    def __init__(self, values: np.ndarray) -> None:
        values.flags.writeable = False
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return NumericArray(self.values[index])
        return self.values[index].item()

    def __iter__(self) -> Iterator:
        for start in range(0, len(self.values), 1 << 16):  # bounded temporary lists
            yield from self.values[start : start + (1 << 16)].tolist()

    def tolist(self) -> list:
        return self.values.tolist()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.values if dtype is None else self.values.astype(dtype)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NumericArray):
            return bool(np.array_equal(self.values, other.values))
        return super().__eq__(other)


class StringArray(GGUFArray):
    """A string array as the file holds it: `raw` is the items' bytes, each preceded by its
    u64 length; item i is raw[starts[i] + 8 : starts[i + 1]] (UTF-8, checked when parsed)."""

    __slots__ = ("raw", "starts")

    def __init__(self, raw: bytes, starts: np.ndarray) -> None:
        starts.flags.writeable = False
        self.raw, self.starts = raw, starts  # starts: n + 1 int64, the last is len(raw)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"string array index {index} out of range ({n} items)")
        index %= n
        return self.raw[int(self.starts[index]) + 8 : int(self.starts[index + 1])].decode()

    def __iter__(self) -> Iterator[str]:
        raw, bounds = self.raw, self.starts.tolist()
        for i in range(len(bounds) - 1):
            yield raw[bounds[i] + 8 : bounds[i + 1]].decode()

    @property
    def nbytes(self) -> int:
        return len(self.raw) + self.starts.nbytes
