"""Streaming detokenization: token ids in one at a time, only complete UTF-8 text out.

A character may be split across tokens (byte-level BPE tokens and SentencePiece byte-fallback
tokens carry single bytes), so bytes of an unfinished multi-byte sequence are held back until
the token that completes them arrives. Concatenating every push() and the final flush() gives
exactly Tokenizer.decode() of the same ids.
"""

from __future__ import annotations

import codecs

from loaders.tokenizer import Tokenizer


class StreamDecoder:
    """Incremental decoder for one generated sequence."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._count = 0
        self._strip_space = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        data = self.tokenizer.piece(token_id, special=not self.skip_special)
        if self._count == 0:
            self._strip_space = self.tokenizer.strips_space_after(token_id)
        elif self._count == 1 and self._strip_space and data[:1] == b" ":
            data = data[1:]
        self._count += 1
        return self._utf8.decode(data, final=False)

    def flush(self) -> str:
        """End of stream: whatever is still held back, invalid bytes as U+FFFD."""
        return self._utf8.decode(b"", final=True)
