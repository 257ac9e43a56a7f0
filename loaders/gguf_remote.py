"""The header of a GGUF on a web server (the hub), read with HTTP Range requests: metadata and
tensor table without the weights, so `tandem plan hf.co/...` can say whether a 40 GB model
fits, and how fast it would run, before anything is downloaded.

The header is read progressively: the first STEP bytes, then STEP more at a time, until the
parse finds the whole tensor table inside what was read. The parse runs on a sparse temporary
file of the remote file's full size holding only the bytes read so far (so tensor offsets are
checked against the real size, and no memory or disk is spent on the rest).
"""

from __future__ import annotations

import mmap
import tempfile
from collections.abc import Callable

from loaders.gguf_parse import GGUFHeader, parse_gguf
from quant.errors import GGUFError, PullError

STEP = 128 << 10
MAX_HEADER = 256 << 20  # a header larger than this is refused

Fetch = Callable[[int, int], bytes]  # (start, stop) -> the bytes [start, stop)


def remote_header(fetch: Fetch, size: int, source: str) -> tuple[GGUFHeader, int]:
    """The parsed header of the `size`-byte file `fetch` reads; also how many bytes it read."""
    with tempfile.TemporaryFile() as f:
        f.truncate(size)
        have = 0
        while True:
            stop = min(size, have + STEP)
            chunk = fetch(have, stop)
            if len(chunk) != stop - have:
                raise PullError(f"{source}: asked for bytes {have}-{stop - 1}, got {len(chunk)}")
            f.seek(have)
            f.write(chunk)
            f.flush()
            have = stop
            error = None
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as view:
                try:
                    header = parse_gguf(view, source)
                    if header.data_offset <= have or have >= size:
                        return header, have
                except GGUFError as err:  # the table goes on past what was read
                    error = err
            if have >= size or have >= MAX_HEADER:
                raise error or GGUFError(f"{source}: no complete GGUF header in {have} bytes")


def http_fetcher(url: str, token: str | None) -> Fetch:
    """Range reads of `url` with huggingface_hub's HTTP session (redirects followed)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers(token=token)

    def fetch(start: int, stop: int) -> bytes:
        r = get_session().get(
            url, headers={**headers, "Range": f"bytes={start}-{stop - 1}"}, follow_redirects=True
        )
        hf_raise_for_status(r)
        if r.status_code != 206:
            raise PullError(f"{url} does not answer Range requests (status {r.status_code})")
        return r.content

    return fetch
