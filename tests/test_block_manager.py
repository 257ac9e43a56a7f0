"""BlockManager: exact block ids and reference counts through allocate, append, free,
prefix hits, copy-on-write and eviction order."""

from __future__ import annotations

from runtime.engine.block_manager import BlockManager
from runtime.kv.kv_pool import BLOCK_SIZE

B = BLOCK_SIZE


def tokens(n: int, offset: int = 0) -> list[int]:
    return [offset + i for i in range(n)]


def fill(bm: BlockManager, seq: int, ids: list[int]) -> list[tuple[int, int]]:
    """Open a sequence, make room for all of ids not cached, and register what is written."""
    cached = bm.open(seq, ids)
    copies = bm.prepare_append(seq, cached, len(ids) - cached)
    bm.register(seq, ids, len(ids))
    return copies


def test_allocate_in_order_and_free_to_the_tail():
    bm = BlockManager(8)
    fill(bm, 1, tokens(2 * B + 3))  # 3 blocks: two full, one partial
    assert bm.table(1) == [0, 1, 2]
    assert bm.ref[:3] == [1, 1, 1]
    assert bm.num_free == 5
    bm.free(1)
    assert bm.num_free == 8
    assert bm.ref[:3] == [0, 0, 0]
    # never-used blocks first, then the freed ones, last block of the sequence first
    assert list(bm.free_queue) == [3, 4, 5, 6, 7, 2, 1, 0]


def test_append_grows_the_table_one_block_at_a_time():
    bm = BlockManager(4)
    fill(bm, 1, tokens(B))  # exactly one full block
    assert bm.table(1) == [0]
    assert bm.prepare_append(1, B, 1) == []  # position B starts block 2
    assert bm.table(1) == [0, 1]
    for pos in range(B + 1, 2 * B):  # the rest of block 2 needs nothing new
        assert bm.prepare_append(1, pos, 1) == []
    assert bm.table(1) == [0, 1]
    bm.prepare_append(1, 2 * B, 1)
    assert bm.table(1) == [0, 1, 2]


def test_prefix_hit_shares_full_blocks_by_reference():
    bm = BlockManager(8)
    system = tokens(2 * B)  # two full blocks of shared prefix
    fill(bm, 1, system + [900, 901])
    assert bm.table(1) == [0, 1, 2]
    cached = bm.open(2, system + [700, 701, 702])
    assert cached == 2 * B
    assert bm.table(2) == [0, 1]
    assert bm.ref[:3] == [2, 2, 1]
    bm.prepare_append(2, cached, 3)
    assert bm.table(2) == [0, 1, 3]
    bm.free(1)
    assert bm.ref[:4] == [1, 1, 0, 1]


def test_prefix_hit_leaves_the_last_token_to_compute():
    bm = BlockManager(8)
    ids = tokens(2 * B)
    fill(bm, 1, ids)
    bm.free(1)
    # the same 32 tokens again: only the first block is taken, so the last token is computed
    assert bm.open(2, ids) == B
    assert bm.table(2) == [0]


def test_a_different_prefix_misses_even_with_equal_later_blocks():
    bm = BlockManager(8)
    fill(bm, 1, tokens(B, 0) + tokens(B, 100) + [1])
    # block 2 has the same tokens but a different parent: no hit
    assert bm.open(2, tokens(B, 50) + tokens(B, 100) + [1]) == 0


def test_cached_blocks_survive_free_until_evicted_oldest_first():
    bm = BlockManager(4)
    fill(bm, 1, tokens(2 * B) + [5])  # blocks 0, 1 (full, keyed), 2 (partial)
    bm.free(1)
    assert list(bm.free_queue) == [3, 2, 1, 0]
    # a new unrelated sequence of 2 blocks takes 3, then 2 (partial, unkeyed): 0 and 1 stay
    fill(bm, 2, tokens(B + 1, 500))
    assert bm.table(2) == [3, 2]
    assert bm.open(3, tokens(2 * B) + [6]) == 2 * B  # still a hit
    assert bm.table(3) == [0, 1]
    bm.free(3)
    bm.free(2)
    assert list(bm.free_queue) == [1, 0, 2, 3]
    # two new blocks now evict block 1 (the prefix's tail) before block 0 (its head)
    fill(bm, 4, tokens(B + 1, 900))
    assert bm.table(4) == [1, 0]
    assert bm.open(5, tokens(2 * B) + [6]) == 0  # both evicted


def test_copy_on_write_of_a_shared_partial_block():
    bm = BlockManager(8)
    prompt = tokens(B + 5)
    fill(bm, 1, prompt)
    assert bm.table(1) == [0, 1]
    bm.fork(1, 2)
    bm.fork(1, 3)
    assert bm.table(2) == [0, 1] and bm.ref[:2] == [3, 3]
    # child 2 writes position B+5, inside shared block 1: it gets a copy (block 2)
    assert bm.prepare_append(2, B + 5, 1) == [(1, 2)]
    assert bm.table(2) == [0, 2]
    assert bm.ref[:3] == [3, 2, 1]
    # child 3 too; then the parent is the only holder of block 1 and writes in place
    assert bm.prepare_append(3, B + 5, 1) == [(1, 3)]
    assert bm.prepare_append(1, B + 5, 1) == []
    assert bm.table(1) == [0, 1] and bm.ref[:4] == [3, 1, 1, 1]


def test_out_of_blocks_is_a_return_value_and_changes_nothing():
    bm = BlockManager(2)
    fill(bm, 1, tokens(B + 1))
    bm.open(2, tokens(3, 100))
    assert bm.prepare_append(2, 0, B + 1) is None  # needs 2 blocks, 0 free
    assert bm.table(2) == [] and bm.num_free == 0 and bm.ref == [1, 1]
    bm.fork(1, 3)
    assert bm.prepare_append(3, B + 1, 1) is None  # a copy-on-write needs a free block too
    assert bm.table(3) == [0, 1] and bm.ref == [2, 2]


def test_prefix_keys_are_cryptographic_not_hash(monkeypatch):
    """Even if Python's hash() collided for every block, different tokens share no KV: the
    key is sha256 of the parent key and the token ids, so only equal prefixes hit."""
    import runtime.engine.block_manager as module

    monkeypatch.setattr(module, "hash", lambda _: 0, raising=False)  # every hash() collides
    bm = BlockManager(8)
    fill(bm, 1, tokens(2 * B + 1, 0))
    assert bm.open(2, tokens(2 * B + 1, 500)) == 0  # different tokens: no hit
    assert bm.table(2) == []
    assert bm.open(3, tokens(B, 0) + tokens(B + 1, 500)) == B  # shares only the equal block
    assert bm.table(3) == [0]


def test_prefix_keys_chain_the_parent_and_are_stable():
    a, b = tokens(B, 0), tokens(B, 100)
    k1 = module_keys(a + b)
    assert k1 == module_keys(a + b)  # a deterministic digest (not salted per process)
    assert len(k1[0]) == 32  # sha256
    assert module_keys(b + b)[1] != k1[1]  # equal block, different parent: different key
    assert module_keys(a + b, keys=[k1[0]]) == k1  # computed keys are extended, not redone


def module_keys(ids, keys=None):
    from runtime.engine.block_manager import block_keys

    return block_keys(ids, len(ids) // B, keys)


def test_register_keeps_the_first_copy_of_equal_content():
    bm = BlockManager(8)
    ids = tokens(B + 1)
    bm.open(1, ids)
    bm.open(2, ids)  # computed concurrently: neither is cached yet
    bm.prepare_append(1, 0, len(ids))
    bm.prepare_append(2, 0, len(ids))
    bm.register(1, ids, len(ids))
    bm.register(2, ids, len(ids))
    assert bm.table(1) == [0, 1] and bm.table(2) == [2, 3]
    assert bm.key_of[0] is not None and bm.key_of[2] is None
    assert bm.open(3, ids) == B and bm.table(3) == [0]
