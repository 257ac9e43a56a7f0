"""Hypothesis fuzz of the GGUF parser and the model checks after it (issue 13): random
mutations of a small valid model GGUF — bit flips, extreme integers written over any field
(counts, lengths, types, shapes, offsets), truncations — are parsed or refused with a
one-line GGUFError, never another exception; a header that parses goes through
ModelConfig's type and tensor-table checks, which pass or raise a TandemError. Each example
is bounded in time and traced memory. A fixed number of examples keeps CI time bounded."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
from gguf_models import write_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaders.config import ModelConfig
from loaders.gguf_parse import parse_gguf
from quant.errors import GGUFError, TandemError

EXTREMES = [0, 1, 2, 0x7F, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 2**31, 2**32, 2**63, 2**64 - 1]
TIME_LIMIT_S = 1.0
MEMORY_LIMIT = 16 << 20  # traced bytes per example (the file itself is ~70 KB)


@pytest.fixture(scope="module")
def model_image(tmp_path_factory) -> tuple[bytes, int]:
    """A valid 2-block llama GGUF and where its header ends."""
    path = write_model(Path(tmp_path_factory.mktemp("fuzz")) / "tiny.gguf")
    data = path.read_bytes()
    return data, parse_gguf(data).data_offset


@st.composite
def mutated(draw, data: bytes, header_end: int) -> bytes:
    buf = bytearray(data)
    where = st.one_of(st.integers(0, 23), st.integers(0, header_end - 1))
    edit = st.one_of(
        st.tuples(st.just("flip"), where, st.integers(0, 7)),
        st.tuples(st.just("set"), where, st.sampled_from(EXTREMES), st.sampled_from([1, 2, 4, 8])),
        st.tuples(st.just("delete"), where, st.integers(1, 16)),
        st.tuples(st.just("insert"), where, st.binary(min_size=1, max_size=16)),
    )
    for kind, pos, *args in draw(st.lists(edit, min_size=1, max_size=4)):
        if kind == "flip":
            buf[pos] ^= 1 << args[0]
        elif kind == "set":
            value, width = args
            buf[pos : pos + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        elif kind == "delete":
            del buf[pos : pos + args[0]]
        else:
            buf[pos:pos] = args[0]
    cut = draw(st.one_of(st.none(), st.integers(0, len(buf))))
    return bytes(buf if cut is None else buf[:cut])


def check_one(data: bytes) -> str:
    """Parse (and check as a model) one input; the outcome's kind."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        try:
            header = parse_gguf(data, source="fuzz.gguf")
        except GGUFError as e:
            assert "\n" not in str(e) and str(e).startswith("fuzz.gguf: ")
            return "refused"
        try:
            ModelConfig.from_metadata(header.metadata, header.tensors)
        except TandemError as e:
            assert "\n" not in str(e)
            return "implausible"
        return "model"
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < TIME_LIMIT_S, f"took {elapsed:.2f} s"
        assert peak < MEMORY_LIMIT, f"traced peak {peak} bytes"


def test_unmutated_image_is_a_model(model_image: tuple[bytes, int]) -> None:
    assert check_one(model_image[0]) == "model"


def test_fuzz_parser_and_model_checks(model_image: tuple[bytes, int]) -> None:
    data, header_end = model_image
    seen: dict[str, int] = {}

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(mutated(data, header_end))
    def run(case: bytes) -> None:
        outcome = check_one(case)
        seen[outcome] = seen.get(outcome, 0) + 1

    run()
    assert seen.get("refused", 0) > 0, seen  # the mutations do reach the checks
