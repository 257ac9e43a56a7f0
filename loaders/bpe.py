"""Byte-level BPE (GGUF `tokenizer.ggml.model` = "gpt2"), tokenizing the way llama.cpp does.

A text fragment is split into words by the pre-tokenizer regexes named by
`tokenizer.ggml.pre` (applied in sequence; each regex splits every piece into its matches
and the gaps between them), each word's UTF-8 bytes are mapped to printable characters as
GPT-2 does, and the word is merged pair by pair: always the adjacent pair with the lowest
merge rank (its index in `tokenizer.ggml.merges`), the leftmost one on ties.

Gemma 4 (`tokenizer.ggml.model` = "gemma4") runs the same merging SentencePiece-style:
spaces become U+2581, the text is split only at newlines, words stay raw UTF-8 (no byte
map), and a symbol that is not a token falls back to `<0xXX>` byte tokens.
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass

import regex

from quant.errors import TokenizerError, UnsupportedError

SPACE = "\u2581"

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (  # Qwen2's, with combining marks (\p{M}) kept inside words
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK_RUNS = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"  # DeepSeek's CJK, kana, Hangul runs
# DeepSeek LLM's letters: the cased and Latin/Greek/Cyrillic/… letter blocks of its tokenizer.
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a"
    "\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
    "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184"
    "\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM = (
    r"[\r\n]",
    r"\s?[" + _DEEPSEEK_LETTERS + "]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+\Z",  # "$": the end of the piece only (ECMAScript has no "before a final newline")
    _CJK_RUNS,
    r"\p{N}+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_RUNS, r"\p{N}")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")


class TooManyTokens(Exception):
    """Raised by the backends' `encode(..., limit)` once the limit is certainly exceeded."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} tokens")
        self.limit = limit


@dataclass(frozen=True)
class PreTokenizer:
    """How one `tokenizer.ggml.pre` family splits text, and the defaults it implies."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is emitted whole
    add_bos: bool = False  # default for tokenizer.ggml.add_bos_token
    spm_style: bool = False  # Gemma 4: spaces as U+2581, raw UTF-8, <0xXX> byte fallback


_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2_PRE = PreTokenizer((_GPT2,))
_DIGITS_GPT2 = PreTokenizer((r"\p{N}", _GPT2))
_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_PRE = PreTokenizer((_QWEN2,))
GEMMA4_PRE = PreTokenizer(("[^\\n]+|[\\n]+",), add_bos=True, spm_style=True)

# tokenizer.ggml.pre -> pre-tokenizer, grouped as llama.cpp's llama-vocab.cpp groups them.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), _GPT2_PRE),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        _DIGITS_GPT2,
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "lfm2"),
        _LLAMA3_PRE,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"), _QWEN2_PRE),
    "qwen35": PreTokenizer((_QWEN35,)),
    "deepseek-llm": PreTokenizer(_DEEPSEEK_LLM),
    "deepseek-coder": PreTokenizer(_DEEPSEEK_CODER),
    "falcon": PreTokenizer(_FALCON),
    "gemma4": GEMMA4_PRE,
}


def pre_tokenizer(name: str | None) -> PreTokenizer:
    """The pre-tokenizer for a `tokenizer.ggml.pre` value (missing -> "default")."""
    if not name:
        return _DEFAULT
    try:
        return PRE_TOKENIZERS[name]
    except KeyError:
        supported = ", ".join(sorted(PRE_TOKENIZERS))
        raise UnsupportedError(
            f"unsupported BPE pre-tokenizer tokenizer.ggml.pre={name!r}; supported: {supported}"
        ) from None


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR: list[str] = _bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
_ENCODE_TABLE = {b: c for b, c in enumerate(BYTE_TO_CHAR)}


def byte_encode(word: str) -> str:
    """A word's UTF-8 bytes as GPT-2 byte-level characters."""
    return word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_ENCODE_TABLE)


def byte_decode(text: str) -> bytes:
    """Inverse of byte_encode; characters outside the table pass through as UTF-8."""
    out = bytearray()
    for ch in text:
        b = CHAR_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8", "surrogatepass")
        else:
            out.append(b)
    return bytes(out)


def parse_merges(merges: list[str]) -> dict[tuple[str, str], int]:
    """Merge ranks from "left right" strings; the split is at the first space after index 0."""
    ranks: dict[tuple[str, str], int] = {}
    for rank, merge in enumerate(merges):
        if not isinstance(merge, str):
            raise TokenizerError(f"tokenizer.ggml.merges[{rank}] is not a string")
        pos = merge.find(" ", 1)
        if pos < 0:
            continue  # malformed: llama.cpp maps it to a pair that never matches
        ranks.setdefault((merge[:pos], merge[pos + 1 :]), rank)
    return ranks


class BPEModel:
    """Byte-level BPE over a GGUF vocabulary and merge list."""

    _CACHE_LIMIT = 200_000

    def __init__(self, token_to_id: dict[str, int], merges: list[str], pre: PreTokenizer):
        self.token_to_id = token_to_id
        self.ranks = parse_merges(merges)
        self.pre = pre
        self._regexes = [regex.compile(r) for r in pre.regexes]
        self._cache: dict[str, tuple[int, ...]] = {}
        self._max_token_bytes: int | None = None

    def split_words(self, text: str) -> list[str]:
        """Apply the pre-tokenizer regexes in sequence (matches and gaps both kept)."""
        pieces = [text]
        for rx in self._regexes:
            out: list[str] = []
            for piece in pieces:
                pos = 0
                for m in rx.finditer(piece):
                    if m.start() > pos:
                        out.append(piece[pos : m.start()])
                    if m.end() > m.start():
                        out.append(m.group())
                    pos = m.end()
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of one raw-text fragment (no special-token handling here). With `limit`,
        stops with TooManyTokens as soon as more than `limit` ids are certain: a word longer
        than (limit + 1) × the longest token is refused before it is merged."""
        ids: list[int] = []
        longest = self.max_token_bytes
        spm_style = self.pre.spm_style
        if spm_style:
            text = text.replace(" ", SPACE)
        for word in self.split_words(text):
            enc = word if spm_style else byte_encode(word)
            if limit is not None and len(enc) > (limit - len(ids) + 1) * longest:
                raise TooManyTokens(limit)
            cached = self._cache.get(enc)
            if cached is None:
                cached = tuple(self._encode_word(enc))
                if len(enc) <= 256:  # a long word is not worth keeping (nor its memory)
                    if len(self._cache) >= self._CACHE_LIMIT:
                        self._cache.clear()
                    self._cache[enc] = cached
            ids.extend(cached)
            if limit is not None and len(ids) > limit:
                raise TooManyTokens(limit)
        return ids

    @property
    def max_token_bytes(self) -> int:
        """The most input bytes one token covers (each byte-level character is one byte).
        A byte with no token of its own (e.g. 0x04 in some vocabularies) yields no id, as in
        llama.cpp; the token limits still count it, so a text of nothing else is refused."""
        if self._max_token_bytes is None:
            self._max_token_bytes = max((len(t) for t in self.token_to_id), default=1)
        return self._max_token_bytes

    def _encode_word(self, word: str) -> list[int]:
        if self.pre.ignore_merges and word in self.token_to_id:
            return [self.token_to_id[word]]
        if self.pre.spm_style and word in self.token_to_id and not word.strip("\n"):
            return [self.token_to_id[word]]  # a run of newlines that is one token stays whole
        ids: list[int] = []
        for sym in self._merge(word):
            tid = self.token_to_id.get(sym)
            if tid is not None:
                ids.append(tid)
            elif self.pre.spm_style:  # <0xXX> byte tokens; a byte without one is dropped
                found = (self.token_to_id.get(f"<0x{b:02X}>") for b in sym.encode("utf-8"))
                ids.extend(t for t in found if t is not None)
            else:
                # llama.cpp looks each byte of the symbol's text up as a one-byte token: only
                # ASCII characters can match; the others are dropped.
                ids.extend(self.token_to_id[c] for c in sym if c < "\x80" and c in self.token_to_id)
        return ids

    def piece_bytes(self, text: str) -> bytes:
        """What a normal token of this vocabulary stands for."""
        if self.pre.spm_style:
            return text.replace(SPACE, " ").encode("utf-8", "surrogatepass")
        return byte_decode(text)

    def _merge(self, word: str) -> list[str]:
        """Merge adjacent symbols by lowest rank (leftmost on ties) until none applies.

        O(n log n) in the word's length with about 60 bytes per character: heap entries are
        single ints (rank << 32 | left position; a rank names one pair, so an entry is still
        current exactly when the pair now at `left` has that rank) and the links are arrays.
        """
        syms: list[str] = list(word)
        n = len(syms)
        if n < 2:
            return syms
        nxt = array("q", range(1, n + 1))
        nxt[n - 1] = -1
        prv = array("q", range(-1, n - 1))
        ranks = self.ranks
        heap: list[int] = []
        for i in range(n - 1):
            rank = ranks.get((syms[i], syms[i + 1]))
            if rank is not None:
                heap.append(rank << 32 | i)
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            key = pop(heap)
            left = key & 0xFFFFFFFF
            right = nxt[left]
            if right < 0 or not syms[left]:
                continue
            if ranks.get((syms[left], syms[right])) != key >> 32:
                continue  # outdated: one side has been merged since
            syms[left], syms[right] = syms[left] + syms[right], ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
                rank = ranks.get((syms[left], syms[after]))
                if rank is not None:
                    push(heap, rank << 32 | left)
            before = prv[left]
            if before >= 0:
                rank = ranks.get((syms[before], syms[left]))
                if rank is not None:
                    push(heap, rank << 32 | before)
        return [s for s in syms if s]
