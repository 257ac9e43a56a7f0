"""WordPiece (GGUF `tokenizer.ggml.model` = "bert"), tokenizing the way llama.cpp does.

The GGUF vocabulary marks a word-initial piece with a leading U+2581 ('▁') and keeps
continuation pieces bare (the converter rewrote BERT's "##" convention). A text fragment is
normalized and split into words as BERT's basic tokenizer does: whitespace ends a word;
NUL, U+FFFD and control/format characters vanish; with `strip_accents` each character is
replaced by the first character of its NFD decomposition and combining marks vanish; with
`lowercase` characters are lowered; punctuation, ASCII symbols and CJK ideographs are words
of their own. Each word, prefixed with '▁', is covered greedily by the longest vocabulary
token from the left; a word with any uncovered part becomes the single unknown token.
"""

from __future__ import annotations

import sys
import unicodedata

from loaders.bpe import TooManyTokens
from quant.errors import TokenizerError

SPACE = "\u2581"
# Unicode's White_Space property, the set llama.cpp's WordPiece splits on.
_WHITESPACE = frozenset(
    [*range(0x09, 0x0E), *range(0x2000, 0x200B)]
    + [0x20, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)
_DROPPED = frozenset(("Cc", "Cf", "Co", "Cs"))  # control, format, private use, surrogate
# The CJK ideograph blocks BERT isolates (the 0x2B920 start follows HF's Rust tokenizer).
_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK)


def _lower(ch: str) -> str:
    """Unicode's simple (one-character) lowercase mapping."""
    low = ch.lower()
    return low if len(low) == 1 else low[0]  # U+0130 lowers to "i\u0307"; simple is "i"


def _stands_alone(ch: str, category: str) -> bool:
    """Punctuation, an ASCII symbol or a CJK ideograph: a word of its own."""
    cp = ord(ch)
    return category[0] == "P" or (cp < 0x7F and category[0] == "S") or _is_cjk(cp)


class WordPieceModel:
    """Greedy longest-match WordPiece over a GGUF vocabulary."""

    # Whitespace, control characters and accents produce no token, so no count of
    # characters per token bounds a text's length: the early length refusal is disabled.
    max_token_chars = sys.maxsize

    def __init__(
        self,
        token_to_id: dict[str, int],
        unk_id: int | None,
        lowercase: bool = True,
        strip_accents: bool = True,
    ):
        self.token_to_id = token_to_id
        self.unk_id = unk_id
        self.lowercase = lowercase
        self.strip_accents = strip_accents
        self._longest = max((len(t) for t in token_to_id), default=1)
        self._cache: dict[str, tuple[int, ...]] = {}

    def split_words(self, text: str) -> list[str]:
        """BERT's basic tokenization of a fragment into normalized words."""
        words: list[str] = []
        word: list[str] = []
        for ch in text:
            if self.strip_accents:
                ch = unicodedata.normalize("NFD", ch)[0]
            cp = ord(ch)
            if cp in _WHITESPACE:
                if word:
                    words.append("".join(word))
                    word = []
                continue
            category = unicodedata.category(ch)
            if cp == 0 or cp == 0xFFFD or category in _DROPPED:
                continue
            if self.strip_accents and category[0] == "M":
                continue
            out = _lower(ch) if self.lowercase else ch
            if _stands_alone(ch, category):
                if word:
                    words.append("".join(word))
                    word = []
                words.append(out)
            else:
                word.append(out)
        if word:
            words.append("".join(word))
        return words

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of one raw-text fragment (no special-token handling here); with
        `limit`, TooManyTokens as soon as more than `limit` ids result."""
        ids: list[int] = []
        for word in self.split_words(text):
            cached = self._cache.get(word)
            if cached is None:
                cached = self._encode_word(SPACE + word)
                if len(word) <= 64:
                    self._cache[word] = cached
            ids.extend(cached)
            if limit is not None and len(ids) > limit:
                raise TooManyTokens(limit)
        return ids

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """Longest vocabulary token from each position on; any gap: the unknown token."""
        ids: list[int] = []
        i, n = 0, len(word)
        while i < n:
            for j in range(min(n, i + self._longest), i, -1):
                tid = self.token_to_id.get(word[i:j])
                if tid is not None:
                    ids.append(tid)
                    i = j
                    break
            else:
                return self._unknown()
        return tuple(ids) if ids else self._unknown()

    @staticmethod
    def piece_bytes(text: str) -> bytes:
        """What a normal token stands for: its text with '▁' read as a space."""
        return text.replace(SPACE, " ").encode("utf-8", "surrogatepass")

    def _unknown(self) -> tuple[int, ...]:
        if self.unk_id is None:
            raise TokenizerError(
                "a word has no WordPiece cover and the vocabulary has no unknown token "
                "(tokenizer.ggml.unknown_token_id)"
            )
        return (self.unk_id,)
