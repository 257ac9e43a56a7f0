"""The tokenizer facade: GGUF tokenizer metadata in, llama.cpp-identical token ids out.

`Tokenizer.from_metadata(md)` reads the `tokenizer.ggml.*` keys and builds a byte-level
BPE ("gpt2"; Gemma 4's SentencePiece-style "gemma4", loaders/bpe.py), SentencePiece ("llama",
loaders/spm.py) or WordPiece ("bert", loaders/wordpiece.py) backend. Encoding
first partitions the text around special tokens the way llama.cpp does (longest token text
first; CONTROL/UNKNOWN tokens only when parse_special, USER_DEFINED always), then hands the
remaining fragments to the backend. Token types follow llama.cpp's GGUF convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loaders import bpe, spm, wordpiece
from quant.errors import ContextLengthError, TokenizerError, UnsupportedError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SUPPORTED_MODELS = ("gpt2", "llama", "bert", "gemma4")
# llama.cpp's default special ids per tokenizer model (bos, eos, unk, sep).
_DEFAULT_IDS: dict[str, tuple[int | None, ...]] = {
    "llama": (1, 2, 0, None),
    "bert": (101, None, 100, 102),
    "gpt2": (None, None, None, None),
    "gemma4": (None, None, None, None),
}
_K = "tokenizer.ggml."

# Texts llama.cpp recognises by name (llama-vocab.cpp); such tokens are forced to CONTROL.
_ROLE_TEXTS: dict[str, tuple[str, ...]] = {
    "eot": (
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    ),
    "eom": ("<|eom_id|>",),
    "fim_pre": (
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ),
    "fim_suf": (
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ),
    "fim_mid": (
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_ROLE_KEYS = {
    "fim_pre": ("fim_pre", "prefix"),
    "fim_suf": ("fim_suf", "suffix"),
    "fim_mid": ("fim_mid", "middle"),
}
# End-of-generation markers: every token with one of these texts ends generation.
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    }
)


def _as_list(md: dict[str, Any], key: str) -> list | None:
    value = md.get(key)
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TokenizerError(f"{key} must be an array, got {type(value).__name__}")
    return list(value)


def _token_texts(md: dict[str, Any]) -> list[str]:
    tokens = _as_list(md, _K + "tokens")
    if not tokens:
        raise TokenizerError(f"the model has no tokenizer vocabulary ({_K}tokens)")
    out = []
    for i, t in enumerate(tokens):
        if isinstance(t, (bytes, bytearray)):
            t = bytes(t).decode("utf-8", "replace")
        out.append(t if t else f"[EMPTY_{i}]")  # llama.cpp renames empty tokens the same way
    return out


def _per_token(md: dict[str, Any], key: str, n: int, default: Any) -> list:
    values = _as_list(md, _K + key)
    if values is None:
        return [default] * n
    if len(values) < n:
        raise TokenizerError(f"{_K}{key} has {len(values)} entries for {n} tokens")
    return values[:n]


def _too_many(max_tokens: int) -> ContextLengthError:
    return ContextLengthError(
        f"the text is longer than {max_tokens} tokens; shorten it or raise the limit (num_ctx)"
    )


_GROUP = 4  # special-token texts are grouped by their first _GROUP characters


def _prefix_groups(specials: list[tuple[int, str]]) -> list[tuple[str, list[tuple[int, str]]]]:
    """The specials grouped by prefix, so that one substring search rules out a whole group
    (Gemma has 6000+ `<unused…>` tokens); groups and members keep the longest-first order."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for tid, text in specials:
        groups.setdefault(text[:_GROUP], []).append((tid, text))
    return list(groups.items())


def _present(groups: list[tuple[str, list[tuple[int, str]]]], text: str) -> list[tuple[int, str]]:
    """The specials that occur in text, in the specials' longest-first order."""
    found = [m for prefix, members in groups if prefix in text for m in members if m[1] in text]
    if len(groups) > 1:
        found.sort(key=lambda m: (-len(m[1]), m[0]))
    return found


def _special_id(md: dict[str, Any], name: str, n: int, default: int | None) -> int | None:
    value = md.get(f"{_K}{name}_token_id")
    if isinstance(value, int) and 0 <= value < n:
        return value
    return default if default is not None and 0 <= default < n else None


def _backend(
    model: str, md: dict[str, Any], token_to_id: dict[str, int], ids: dict[str, int | None]
) -> tuple[Any, bool, bool]:
    """The backend for a tokenizer model, with its add_bos and add_space_prefix defaults."""
    if model == "llama":
        scores = [float(s) for s in _per_token(md, "scores", len(token_to_id), 0.0)]
        return spm.SPMModel(token_to_id, scores, ids["unk"]), True, True
    if model == "bert":
        lowercase = bool(md.get(_K + "normalizer.lowercase", True))
        strip = bool(md.get(_K + "normalizer.strip_accents", lowercase))
        return wordpiece.WordPieceModel(token_to_id, ids["unk"], lowercase, strip), True, False
    merges = _as_list(md, _K + "merges")
    if merges is None:
        raise TokenizerError(f"BPE tokenizer without merges ({_K}merges)")
    pre = bpe.GEMMA4_PRE if model == "gemma4" else bpe.pre_tokenizer(md.get(_K + "pre"))
    return bpe.BPEModel(token_to_id, merges, pre), pre.add_bos, False


class Tokenizer:
    """Encode text to token ids and decode them back, exactly as llama.cpp does."""

    def __init__(
        self,
        tokens: list[str],
        types: list[int],
        backend: Any,
        model: str,
        ids: dict[str, int | None],
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
        add_sep: bool = False,
    ):
        self.tokens = tokens
        self.types = types
        self.model = model
        self.backend = backend
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.add_bos, self.add_eos = add_bos, add_eos
        self.add_space_prefix = add_space_prefix
        self.sep_id, self.add_sep = ids.get("sep"), add_sep
        wanted_ids = (
            ("bos", add_bos, self.bos_id),
            ("eos", add_eos, self.eos_id),
            ("sep", add_sep, self.sep_id),
        )
        for flag, wanted, tid in wanted_ids:
            if wanted and tid is None:
                raise TokenizerError(
                    f"{_K}add_{flag}_token is true but {_K}{flag}_token_id is not set"
                )
        self.eog_ids = self._find_roles_and_eog(ids)
        order = sorted(
            (i for i, t in enumerate(types) if t in (UNKNOWN, CONTROL, USER_DEFINED)),
            key=lambda i: (-len(tokens[i]), i),
        )
        self._specials = [(i, tokens[i]) for i in order]
        self._user_defined = [(i, t) for i, t in self._specials if types[i] == USER_DEFINED]
        self._special_groups = _prefix_groups(self._specials)
        self._user_groups = _prefix_groups(self._user_defined)
        self._pieces: dict[int, bytes] = {}

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> Tokenizer:
        """Build the tokenizer from GGUF metadata (a dict of plain Python values)."""
        model = md.get(_K + "model")
        if model is None:
            raise TokenizerError(f"the model has no {_K}model key")
        if model not in SUPPORTED_MODELS:
            raise UnsupportedError(
                f"unsupported tokenizer {_K}model={model!r}; "
                f"supported: {', '.join(SUPPORTED_MODELS)}"
            )
        tokens = _token_texts(md)
        n = len(tokens)
        types = [int(t) for t in _per_token(md, "token_type", n, NORMAL)]
        token_to_id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            token_to_id.setdefault(t, i)
        bos, eos, unk, sep = _DEFAULT_IDS[model]
        ids = {
            "bos": _special_id(md, "bos", n, bos),
            "eos": _special_id(md, "eos", n, eos),
            "unk": _special_id(md, "unknown", n, unk),
            "sep": _special_id(md, "seperator", n, sep),  # sic: llama.cpp's key name
        }
        for role in _ROLE_TEXTS:
            keys = _ROLE_KEYS.get(role, (role,))
            ids[role] = next(
                (v for k in keys if (v := _special_id(md, k, n, None)) is not None), None
            )
        backend, add_bos_default, space_default = _backend(model, md, token_to_id, ids)
        spm_model = model == "llama"
        wpm_model = model == "bert"  # llama.cpp's WordPiece always adds [CLS] … [SEP]
        return cls(
            tokens,
            types,
            backend,
            model,
            ids,
            # llama.cpp forces BOS on for Gemma 4 whatever the file says.
            add_bos=wpm_model
            or model == "gemma4"
            or bool(md.get(_K + "add_bos_token", add_bos_default)),
            add_eos=not wpm_model and bool(md.get(_K + "add_eos_token", False)),
            add_space_prefix=spm_model and bool(md.get(_K + "add_space_prefix", space_default)),
            add_sep=wpm_model,
        )

    # -- special tokens ---------------------------------------------------------------

    def _find_roles_and_eog(self, ids: dict[str, int | None]) -> frozenset[int]:
        """llama.cpp's by-name detection of EOT/EOM/FIM tokens and the EOG set."""
        lookup = self.backend.token_to_id
        for role, texts in _ROLE_TEXTS.items():
            if ids[role] is None:
                found = next((lookup[t] for t in texts if t in lookup), None)
                ids[role] = found
                if found is not None:
                    self.types[found] = CONTROL
        roles = ("fim_pad", "fim_rep", "fim_sep", "eos", "eot", "eom")
        eog = {i for r in roles if (i := ids[r]) is not None}
        for text in _EOG_TEXTS & lookup.keys():
            eog.add(lookup[text])
            self.types[lookup[text]] = CONTROL
        by_text = {self.tokens[i]: i for i in eog}
        if {"<|end|>", "<|call|>", "<|return|>"} <= by_text.keys() or {
            "<|end|>",
            "<|calls|>",
            "<|flush|>",
        } <= by_text.keys():
            eog.discard(by_text["<|end|>"])  # harmony-style: <|end|> ends a message only
            self.types[by_text["<|end|>"]] = USER_DEFINED
        if {"</s>", "<|tool_response>"} <= by_text.keys():
            eog.discard(by_text["</s>"])
            self.types[by_text["</s>"]] = NORMAL
        return frozenset(eog)

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split text around special tokens: longest token text first, all occurrences."""
        parts: list[str | int] = [text] if text else []
        groups = self._special_groups if parse_special else self._user_groups
        for tid, ttext in _present(groups, text):
            out: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or ttext not in part:
                    out.append(part)
                    continue
                for k, piece in enumerate(part.split(ttext)):
                    if k:
                        out.append(tid)
                    if piece:
                        out.append(piece)
            parts = out
        return parts

    # -- public API -------------------------------------------------------------------

    @property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: text longer than
        n × max_token_chars certainly has more than n tokens, so a caller can refuse it
        before tokenizing (e.g. a server, against num_ctx)."""
        if self._max_token_chars is None:
            longest = max((len(t) for _, t in self._specials), default=1)
            if isinstance(self.backend, bpe.BPEModel):
                backend = self.backend.max_token_bytes
            else:
                backend = self.backend.max_token_chars
            self._max_token_chars = max(longest, backend, 1)
        return self._max_token_chars

    _max_token_chars: int | None = None

    def encode(
        self,
        text: str,
        add_special: bool = True,
        parse_special: bool = True,
        max_tokens: int | None = None,
    ) -> list[int]:
        """Token ids of text; add_special adds BOS/EOS as the model asks. parse_special
        makes CONTROL-token texts in `text` control tokens (as llama.cpp does for raw
        prompts); without it they are plain text. With max_tokens, ContextLengthError as
        soon as the count certainly exceeds it, without tokenizing the rest."""
        return self.encode_segments([(text, parse_special)], add_special, max_tokens)

    def encode_segments(
        self,
        segments: Sequence[tuple[str, bool]],
        add_special: bool = True,
        max_tokens: int | None = None,
    ) -> list[int]:
        """Token ids of the concatenated (text, parse_special) segments: special tokens are
        recognised only inside segments whose flag is set, and text runs that meet across
        segments are tokenized as one (so "as text" segments tokenize exactly as if their
        special-token texts were ordinary characters)."""
        if max_tokens is not None:
            chars = sum(len(t) for t, _ in segments)
            if chars > (max_tokens + 1) * self.max_token_chars:
                raise _too_many(max_tokens)
        parts: list[str | int] = []
        for text, parse_special in segments:
            for part in self._partition(text, parse_special):
                if isinstance(part, str) and parts and isinstance(parts[-1], str):
                    parts[-1] += part
                else:
                    parts.append(part)
        ids: list[int] = []
        if add_special and self.add_bos:
            ids.append(self.bos_id)  # type: ignore[arg-type]
        prev_special = True
        try:
            for part in parts:
                left = None if max_tokens is None else max_tokens - len(ids)
                if isinstance(part, int):
                    ids.append(part)
                    prev_special = True
                elif self.model == "llama":
                    prefix = self.add_space_prefix and prev_special
                    ids.extend(self.backend.encode(part, prefix, left))
                    prev_special = False
                else:  # BPE and WordPiece
                    ids.extend(self.backend.encode(part, left))
                if max_tokens is not None and len(ids) > max_tokens:
                    raise bpe.TooManyTokens(max_tokens)
        except bpe.TooManyTokens:
            raise _too_many(max_tokens) from None  # type: ignore[arg-type]
        for wanted, tid in ((self.add_eos, self.eos_id), (self.add_sep, self.sep_id)):
            if add_special and wanted:
                ids.append(tid)  # type: ignore[arg-type]
                if max_tokens is not None and len(ids) > max_tokens:
                    raise _too_many(max_tokens)
        return ids

    def special_texts_in(self, text: str) -> list[str]:
        """The CONTROL/UNKNOWN/USER_DEFINED token texts that occur in text, longest first."""
        return [t for _, t in _present(self._special_groups, text)]

    def token_str(self, token_id: int) -> str:
        """The raw vocabulary string of a token."""
        self._check(token_id)
        return self.tokens[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; control and unknown tokens give b""."""
        return self.piece(token_id, special=False)

    def piece(self, token_id: int, special: bool = False) -> bytes:
        """A token's bytes; with special, control/unknown tokens render as their text."""
        self._check(token_id)
        kind = self.types[token_id]
        if kind in (CONTROL, UNKNOWN):
            return self.tokens[token_id].encode("utf-8", "surrogatepass") if special else b""
        cached = self._pieces.get(token_id)
        if cached is None:
            cached = self._piece(token_id, kind)
            self._pieces[token_id] = cached
        return cached

    def _piece(self, token_id: int, kind: int) -> bytes:
        text = self.tokens[token_id]
        if kind == USER_DEFINED:
            return text.encode("utf-8", "surrogatepass")
        if kind == NORMAL:
            return self.backend.piece_bytes(text)
        if kind == BYTE:
            b = spm.parse_byte_token(text)
            return b"" if b is None else bytes([b])
        return b""  # unused / undefined types render as nothing, as in llama.cpp

    def strips_space_after(self, first_id: int) -> bool:
        """Whether decoding drops the space the encoder prefixed after this first token."""
        return self.add_space_prefix and first_id == self.bos_id

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ids (invalid UTF-8 becomes U+FFFD); skip_special drops control tokens."""
        pieces = [self.piece(i, special=not skip_special) for i in ids]
        if len(pieces) > 1 and self.strips_space_after(ids[0]) and pieces[1][:1] == b" ":
            pieces[1] = pieces[1][1:]
        return b"".join(pieces).decode("utf-8", "replace")

    def _check(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
