"""SentencePiece tokenization (GGUF `tokenizer.ggml.model` = "llama") as llama.cpp runs it.

llama.cpp does not run SentencePiece's own model: it replaces spaces with U+2581 ('▁'),
splits the fragment into characters, and repeatedly merges the adjacent pair whose
concatenation is a vocabulary token with the highest score (`tokenizer.ggml.scores`),
the leftmost pair on ties. A final symbol that is not a token falls back to byte tokens
`<0xXX>`, one per UTF-8 byte.
"""

from __future__ import annotations

import heapq

from runtime.errors import TokenizerError

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

    def _byte_id(self, b: int, unk_id: int | None) -> int | None:
        tid = self.token_to_id.get(byte_token_text(b))
        if tid is None and b < 0x80:
            tid = self.token_to_id.get(chr(b))
        return unk_id if tid is None else tid

    def encode(self, text: str, add_space_prefix: bool) -> list[int]:
        """Token ids of one raw-text fragment (no special-token handling here)."""
        if add_space_prefix:
            text = " " + text
        text = text.replace(" ", SPACE)
        ids: list[int] = []
        for sym in self._merge(text):
            tid = self.token_to_id.get(sym)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._bytes(sym))
        return ids

    def _bytes(self, sym: str) -> list[int]:
        out = []
        for b in sym.encode("utf-8", "surrogatepass"):
            tid = self.byte_ids[b]
            if tid is None:
                raise TokenizerError(f"no byte-fallback token <0x{b:02X}> and no unknown token")
            out.append(tid)
        return out

    def _merge(self, text: str) -> list[str]:
        """Merge the best-scoring adjacent pair (leftmost on ties) until none is a token."""
        n = len(text)
        if n < 2:
            return [text] if text else []
        start = list(range(n))
        size = [1] * n
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []
        vocab, scores = self.token_to_id, self.scores

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            total = size[left] + size[right]
            tid = vocab.get(text[start[left] : start[left] + total])
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, total))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, total = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != total:
                continue  # outdated: one side has been merged since
            size[left], size[right] = total, 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        return [text[start[i] : start[i] + size[i]] for i in range(n) if size[i]]


def piece_bytes(text: str) -> bytes:
    """What a normal SPM token stands for: its text with '▁' read as a space."""
    return text.replace(SPACE, " ").encode("utf-8", "surrogatepass")
