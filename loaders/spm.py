"""SentencePiece tokenization (GGUF `tokenizer.ggml.model` = "llama") as llama.cpp runs it.

llama.cpp does not run SentencePiece's own model: it replaces spaces with U+2581 ('▁'),
splits the fragment into characters, and repeatedly merges the adjacent pair whose
concatenation is a vocabulary token with the highest score (`tokenizer.ggml.scores`),
the leftmost pair on ties. A final symbol that is not a token falls back to byte tokens
`<0xXX>`, one per UTF-8 byte.
"""

from __future__ import annotations

import heapq
from array import array

from loaders.bpe import TooManyTokens
from quant.errors import TokenizerError

SPACE = "\u2581"


def byte_token_text(b: int) -> str:
    """The vocabulary text of the byte-fallback token for byte b."""
    return f"<0x{b:02X}>"


def parse_byte_token(text: str) -> int | None:
    """The byte a `<0xXX>` token stands for, or None if the text is not of that form."""
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return int(text[3:5], 16)
        except ValueError:
            return None
    return None


class SPMModel:
    """Score-driven pair merging over a GGUF vocabulary, with byte fallback."""

    def __init__(self, token_to_id: dict[str, int], scores: list[float], unk_id: int | None):
        self.token_to_id = token_to_id
        self.scores = scores
        self.byte_ids = [self._byte_id(b, unk_id) for b in range(256)]
        # Merge priority: the dense rank of each token's score, best first (ties share one).
        distinct = sorted(set(scores), reverse=True)
        rank = {s: r for r, s in enumerate(distinct)}
        self._order = [rank[s] for s in scores]
        longest = max((len(t) for t in token_to_id), default=1)
        # The most input characters one token covers (byte tokens cover one).
        self.max_token_chars = max(longest, 1)

    def _byte_id(self, b: int, unk_id: int | None) -> int | None:
        tid = self.token_to_id.get(byte_token_text(b))
        if tid is None and b < 0x80:
            tid = self.token_to_id.get(chr(b))
        return unk_id if tid is None else tid

    def encode(self, text: str, add_space_prefix: bool, limit: int | None = None) -> list[int]:
        """Token ids of one raw-text fragment (no special-token handling here). With `limit`,
        a fragment longer than (limit + 1) × the longest token is refused before merging and
        TooManyTokens raised once more than `limit` ids result."""
        if add_space_prefix:
            text = " " + text
        if limit is not None and len(text) > (limit + 1) * self.max_token_chars:
            raise TooManyTokens(limit)
        text = text.replace(" ", SPACE)
        ids: list[int] = []
        for sym in self._merge(text):
            tid = self.token_to_id.get(sym)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._bytes(sym))
        if limit is not None and len(ids) > limit:
            raise TooManyTokens(limit)
        return ids

    @staticmethod
    def piece_bytes(text: str) -> bytes:
        """What a normal token of this vocabulary stands for."""
        return piece_bytes(text)

    def _bytes(self, sym: str) -> list[int]:
        out = []
        for b in sym.encode("utf-8", "surrogatepass"):
            tid = self.byte_ids[b]
            if tid is None:
                raise TokenizerError(f"no byte-fallback token <0x{b:02X}> and no unknown token")
            out.append(tid)
        return out

    def _merge(self, text: str) -> list[str]:
        """Merge the best-scoring adjacent pair (leftmost on ties) until none is a token.

        Heap entries are single ints (the pair's score order << 32 | left position); an
        entry is current when the pair now at `left` forms a token of that score order (a
        pair of equal score at the same place merges the same way). Links are arrays.
        """
        n = len(text)
        if n < 2:
            return [text] if text else []
        size = array("q", bytes(8 * n))
        for i in range(n):
            size[i] = 1
        nxt = array("q", range(1, n + 1))
        nxt[n - 1] = -1
        prv = array("q", range(-1, n - 1))
        vocab, order = self.token_to_id, self._order

        def key(left: int, right: int) -> int | None:
            tid = vocab.get(text[left : right + size[right]])
            return None if tid is None else order[tid] << 32 | left

        heap = [k for i in range(n - 1) if (k := key(i, i + 1)) is not None]
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            entry = pop(heap)
            left = entry & 0xFFFFFFFF
            right = nxt[left]
            if right < 0 or size[left] == 0 or key(left, right) != entry:
                continue  # outdated: one side has been merged since
            size[left] += size[right]
            size[right] = 0
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
                if (k := key(left, after)) is not None:
                    push(heap, k)
            before = prv[left]
            if before >= 0 and (k := key(before, left)) is not None:
                push(heap, k)
        return [text[i : i + size[i]] for i in range(n) if size[i]]


def piece_bytes(text: str) -> bytes:
    """What a normal SPM token stands for: its text with '▁' read as a space."""
    return text.replace(SPACE, " ").encode("utf-8", "surrogatepass")
