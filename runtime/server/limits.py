"""What one request may ask of the server, checked before any work starts (the HTTP body's
own size and shape are the Guard's and read_json's):

    n                   at most MAX_N samples (each is a sequence decoded beside the others)
    stop                at most MAX_STOPS strings of at most MAX_STOP_CHARS characters
    stop_token_ids      at most MAX_STOP_TOKEN_IDS ids
    the prompt          at most num_ctx × (the longest token's length in characters): no
                        tokenization of it could fit the context, so it is refused unread

A prompt's characters bound its tokens from below: every token covers at most the longest
token text of the vocabulary (a byte-level BPE token's text has one character per byte, so
it never covers more characters than that). A prompt of more than num_ctx times that many
characters cannot fit, whatever the tokenizer does; one below it costs at most that much
tokenizing, however long the body that carried it.
"""

from __future__ import annotations

import math
from typing import Any

from quant.errors import ContextLengthError
from runtime.server.errors import RequestFieldError

MAX_N = 16
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64


def check_n(value: Any, field: str = "n") -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_N:
        raise RequestFieldError(
            field, f"{field} may be at most {MAX_N} on this server, got {value}; send more requests"
        )


def check_stop(value: Any, field: str = "stop") -> None:
    """Refuse too many or too long stop strings (their types are SamplingParams' to check)."""
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list):
        return
    if len(stops) > MAX_STOPS:
        raise RequestFieldError(
            field, f"{field} may hold at most {MAX_STOPS} strings, got {len(stops)}"
        )
    for s in stops:
        if isinstance(s, str) and len(s) > MAX_STOP_CHARS:
            raise RequestFieldError(
                field,
                f"each {field} string may be at most {MAX_STOP_CHARS} characters, "
                f"got one of {len(s)}",
            )


def check_stop_token_ids(value: Any) -> None:
    if isinstance(value, list) and len(value) > MAX_STOP_TOKEN_IDS:
        raise RequestFieldError(
            "stop_token_ids",
            f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(value)}",
        )


def check_prompt_chars(chars: int, tokens: int, num_ctx: int, token_chars: int) -> None:
    """Refuse a prompt of `chars` characters (plus `tokens` token ids given as such) that no
    tokenization could fit into `num_ctx` with one token to spare for the answer."""
    fewest = math.ceil(chars / token_chars) + tokens
    if fewest + 1 > num_ctx:
        raise ContextLengthError(
            f"the prompt has {chars} characters{f' and {tokens} token ids' if tokens else ''}: "
            f"at least {fewest} tokens (no token of this model is longer than {token_chars} "
            f"characters), more than the {num_ctx}-token context holds; shorten the prompt"
        )
