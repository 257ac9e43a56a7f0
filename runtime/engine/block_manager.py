"""BlockManager: which KV pages (blocks of BLOCK_SIZE token positions) each sequence holds.

Only ids and counts live here; the pages themselves are in KVPool, where one block id names
the same page in every layer of a device. Three mechanisms:

- Reference counts: a block may be held by several sequences (prefix sharing, n > 1 forks).
- Prefix caching: a full block is keyed by sha256(key of the block before it, its token
  ids), so equal prefixes find the same blocks; a later request with the same system prompt
  reuses them instead of recomputing. Only full blocks whose KV has been written are
  registered. The key is cryptographic (as vLLM's): a bare hash() could make two different
  prompts collide and share KV. Each sequence's keys are computed once, as blocks fill.
- Free queue with lazy eviction: a block whose count drops to 0 goes to the tail of the free
  queue but keeps its cache key; allocation takes from the head and only then forgets the key
  (eviction). A sequence's blocks are freed last-block-first, so its tail (least likely to be
  shared) is evicted before its head.

Copy-on-write: a sequence about to write into a block that others also hold gets a private
copy first (`prepare_append` returns the (src, dst) page copies for the KV pool to do).

Running out of blocks is a return value (`prepare_append` → None, nothing changed), never an
exception: the scheduler decides whom to preempt.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from runtime.kv.kv_pool import BLOCK_SIZE

ROOT_KEY = b"tandem-kv-prefix"  # the parent key of a sequence's first block


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """sha256 of the parent block's key and this block's token ids (int64, little-endian)."""
    ids = array("q", tokens)
    if ids.itemsize != 8 or array("q", [1]).tobytes()[0] != 1:  # pragma: no cover
        raise RuntimeError("block keys need 8-byte little-endian int64 arrays")
    return hashlib.sha256(parent + ids.tobytes()).digest()


def block_keys(
    token_ids: Sequence[int], n_blocks: int, keys: list[bytes] | None = None
) -> list[bytes]:
    """Chained keys of the first n_blocks full blocks of token_ids; `keys` (the keys of some
    first blocks, already computed) is extended in place and returned."""
    keys = [] if keys is None else keys
    for b in range(len(keys), n_blocks):
        parent = keys[-1] if keys else ROOT_KEY
        keys.append(block_key(parent, token_ids[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]))
    return keys


class BlockManager:
    def __init__(self, num_blocks: int, prefix_caching: bool = True) -> None:
        """prefix_caching: False where KV pages alone cannot resume a sequence (a model with
        recurrent layers, whose per-sequence state the pages do not hold)."""
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks  # key of a registered block
        self.cached: dict[bytes, int] = {}  # cache key -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.tables: dict[int, list[int]] = {}  # sequence id -> block ids, in position order
        self._keys: dict[int, list[bytes]] = {}  # sequence id -> keys of its full blocks so far
        self._registered: dict[int, int] = {}  # sequence id -> full blocks register() has seen

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (never used, freed, or cached with no holder)."""
        return len(self.free_queue)

    def table(self, seq_id: int) -> list[int]:
        return self.tables[seq_id]

    def blocks_needed(self, seq_id: int, n_tokens: int) -> int:
        """New blocks a sequence needs to hold n_tokens positions in all."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-n_tokens // BLOCK_SIZE) - have)

    # ---- lifecycle -----------------------------------------------------------------
    def open(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Start a table for a sequence, taking every cached full block of its prefix; at
        least the last token is left to compute (its logits are needed). → cached tokens."""
        if seq_id in self.tables:
            raise KeyError(f"sequence {seq_id} already has a block table")
        table: list[int] = []
        keys: list[bytes] = []
        for _ in range((len(token_ids) - 1) // BLOCK_SIZE if self.prefix_caching else 0):
            block = self.cached.get(block_keys(token_ids, len(keys) + 1, keys)[-1])
            if block is None:
                break
            self._hold(block)
            table.append(block)
        self.tables[seq_id] = table
        self._keys[seq_id] = keys
        self._registered[seq_id] = 0
        return len(table) * BLOCK_SIZE

    def prepare_append(
        self, seq_id: int, n_computed: int, n_new: int
    ) -> list[tuple[int, int]] | None:
        """Make room to write positions n_computed … n_computed+n_new-1: allocate blocks and
        un-share a shared partial block. → page copies (src, dst) to do before writing, or
        None (and nothing changed) when the free blocks do not suffice."""
        table = self.tables[seq_id]
        first = n_computed // BLOCK_SIZE
        cow = first < len(table) and self.ref[table[first]] > 1
        needed = self.blocks_needed(seq_id, n_computed + n_new) + int(cow)
        if needed > self.num_free:
            return None
        copies = []
        if cow:
            src = table[first]
            table[first] = self._allocate()
            self.ref[src] -= 1  # still held by the others, so never 0 here
            copies.append((src, table[first]))
        while len(table) * BLOCK_SIZE < n_computed + n_new:
            table.append(self._allocate())
        return copies

    def register(self, seq_id: int, token_ids: Sequence[int], n_computed: int) -> None:
        """Key every full block whose KV is now written (positions < n_computed) so later
        sequences can share it; a block whose content is already cached stays private."""
        if not self.prefix_caching:
            return
        table = self.tables[seq_id]
        full = n_computed // BLOCK_SIZE
        keys = block_keys(token_ids, full, self._keys.setdefault(seq_id, []))
        for b in range(self._registered.get(seq_id, 0), full):
            block, key = table[b], keys[b]
            if self.key_of[block] is not None or key in self.cached:
                continue
            self.key_of[block] = key
            self.cached[key] = block
        self._registered[seq_id] = max(full, self._registered.get(seq_id, 0))

    def fork(self, parent: int, child: int) -> None:
        """The child shares every block of the parent (copy-on-write on its next append)."""
        table = list(self.tables[parent])
        for block in table:
            self._hold(block)
        self.tables[child] = table

    def free(self, seq_id: int) -> None:
        """Drop a sequence's hold on its blocks, last block first; keyed blocks stay cached."""
        self._keys.pop(seq_id, None)
        self._registered.pop(seq_id, None)
        for block in reversed(self.tables.pop(seq_id, [])):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free_queue[block] = None

    # ---- internals -----------------------------------------------------------------
    def _hold(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.free_queue[block]
        self.ref[block] += 1

    def _allocate(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        key = self.key_of[block]
        if key is not None:  # evict: its content is about to be overwritten
            del self.cached[key]
            self.key_of[block] = None
        self.ref[block] = 1
        return block
