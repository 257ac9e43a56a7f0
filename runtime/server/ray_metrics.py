"""/metrics on Ray Serve: every replica's tandem metrics on one Prometheus page, each sample
labelled with the replica that produced it.

Serve routes a request to one replica, so the ingress cannot ask them all. Instead each
TandemEngine replica posts its own /metrics text to a MetricsBoard actor every PUSH_S
seconds (the ingress creates the board, named after the application, and it lives as long
as the ingress). The ingress's /metrics reads the board and merges the texts family by
family, as the text format wants a family's samples together under one HELP and TYPE,
adding `replica="<id>"` to every sample. A replica that stops posting (killed, scaled
down) drops out after STALE_S. Ray's own metrics (actors, Serve's request counters) stay on
Ray's metrics export port, where a Prometheus set up for Ray scrapes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import ray
from ray.exceptions import RayError

log = logging.getLogger(__name__)
PUSH_S = 2.0
STALE_S = 3 * PUSH_S
NAMESPACE = "serve"  # where Serve runs its actors: the replicas find the board there


@ray.remote(num_cpus=0)
class MetricsBoard:
    """The latest /metrics text of each replica, with when it came."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def post(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def fresh(self) -> dict[str, str]:
        now = time.monotonic()
        return {r: text for r, (at, text) in self.texts.items() if now - at <= STALE_S}


def board_name(app_name: str) -> str:
    return f"{app_name}-metrics"


def create_board(app_name: str):
    """The application's board (the ingress calls this; an ingress restart finds the old one)."""
    return MetricsBoard.options(  # type: ignore[attr-defined]
        name=board_name(app_name), namespace=NAMESPACE, get_if_exists=True
    ).remote()


async def post_forever(app_name: str, replica: str, render: Callable[[], str]) -> None:
    """A replica's loop: post render() to the board every PUSH_S (looked up again when it is
    not there yet or has gone)."""
    board = None
    while True:
        try:
            if board is None:
                board = ray.get_actor(board_name(app_name), namespace=NAMESPACE)
            await board.post.remote(replica, render())
        except (ValueError, RayError) as err:  # ValueError: no such actor yet
            log.debug("metrics board unavailable: %s", err)
            board = None
        await asyncio.sleep(PUSH_S)


def merge(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas as one: each family once, its samples labelled."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for replica, text in sorted(texts.items()):
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    head = families.setdefault(family, ([], []))[0]
                    if line not in head:
                        head.append(line)
                continue
            name = family or line.split("{", 1)[0].split(" ", 1)[0]
            families.setdefault(name, ([], []))[1].append(labelled(line, replica))
    return "".join("\n".join([*head, *samples]) + "\n" for head, samples in families.values())


def labelled(sample: str, replica: str) -> str:
    """`name{a="b"} 1` → `name{replica="r",a="b"} 1`; `name 1` → `name{replica="r"} 1`."""
    label = f'replica="{replica}"'
    space = sample.find(" ")
    brace = sample.find("{")
    if space < 0:  # not a sample line: left as it is
        return sample
    if brace < 0 or space < brace:
        return f"{sample[:space]}{{{label}}}{sample[space:]}"
    close = sample.index("}", brace)
    inner = sample[brace + 1 : close]
    joined = f"{label},{inner}" if inner.strip() else label
    return f"{sample[:brace]}{{{joined}}}{sample[close + 1 :]}"
