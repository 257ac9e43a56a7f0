"""scripts/qwen35_memory.py at a small size: the RSS a real prefill commits for the KV pages
and the recurrent states is the planner's prediction, for Qwen3.5 (1 attention layer and 3
delta nets of the 0.8B shape) and for a plain transformer of the same dims (4 attention
layers), and the hybrid's is the smaller."""

from __future__ import annotations

import pytest
from conftest import load_script

from kernels import native_loader

pytestmark = pytest.mark.skipif(
    not native_loader.available(), reason="the native CPU kernel is not built here"
)
MIB = 1 << 20


def test_measured_memory_is_the_predicted_one(smollm2_path):
    script = load_script("qwen35_memory")
    results = script.compare(ctx=2048, seqs=4, layers=4, chunk=512, vocab=smollm2_path)
    # by hand: 4 × 2048 slots; an attention layer 2 KV heads × 512 × 2 bytes = 2 KiB a slot;
    # a delta-net layer 4 × (3 × 6144 + 16 × 128 × 128) = 1 122 304 bytes a sequence
    want = {"qwen35": 16 * MIB + 4 * 3 * 1122304, "qwen3": 4 * 16 * MIB}
    for arch, r in results.items():
        assert r["predicted"]["kv_plus_state"] == want[arch]
        got = r["measured"]["rss_delta"]
        # measured within 5% + 4 MiB (the allocator's own pages and what it keeps)
        assert abs(got - want[arch]) <= 0.05 * want[arch] + 4 * MIB, (arch, got, want[arch])
    assert results["qwen35"]["measured"]["state_tensors"] == 4 * 3 * 1122304
    assert results["qwen35"]["measured"]["rss_delta"] < results["qwen3"]["measured"]["rss_delta"]
