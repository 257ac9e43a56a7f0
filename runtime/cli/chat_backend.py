"""Where `tandem run`'s conversation is answered: in this process (Local, the model loaded
here) or by a running `tandem serve` (Remote, ollama's /api/chat), as ollama's client
does. Both take the conversation and options by their Modelfile names, and yield Pieces.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Generator
from dataclasses import dataclass

from quant.errors import ServerUnreachableError, TandemError
from runtime.engine.sequence import Timings
from runtime.sampling_params import OLLAMA_DEFAULTS, SamplingParams


@dataclass
class Piece:
    text: str
    timings: Timings | None = None  # on the last piece
    load_seconds: float | None = None  # the server's load_duration, on the last piece


class Local:
    """The model loaded in this process."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.name = llm.lm.name
        self.load_seconds = llm.lm.load_seconds
        self.base: SamplingParams = llm.options.sampling if llm.options else OLLAMA_DEFAULTS

    def chat(self, messages: list[dict], options: dict, raw: bool) -> Generator[Piece, None, None]:
        """`options` are in self.base already (the Repl keeps it current)."""
        if raw:
            ids = self.llm.tokenize("".join(m["content"] for m in messages if m["role"] == "user"))
        else:
            ids = self.llm.lm.chat_prompt_ids(messages)
        for delta in self.llm.stream(ids, self.base):
            yield Piece(delta.text, delta.timings)

    def info(self) -> dict:
        c, lm = self.llm.lm.config, self.llm.lm
        return {
            "architecture": c.arch,
            "layers": c.n_layer,
            "embedding length": c.n_embd,
            "context length": c.n_ctx_train,
            "num_ctx": self.llm.num_ctx,
            "file": str(lm.path),
        }

    def template(self) -> str:
        return self.llm.lm.template.source

    def defaults(self) -> dict:
        """The Modelfile's PARAMETERs this model was loaded with."""
        return dict(self.llm.lm.parameters)

    def system(self) -> str | None:
        return self.llm.lm.system


class Remote:
    """A running `tandem serve` (or ollama): /api/chat streamed as NDJSON."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.name = url, model
        self.load_seconds = 0.0

    def _post(self, path: str, body: dict, timeout: float | None = None):
        req = urllib.request.Request(
            f"{self.url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read()).get("error", str(err))
            except ValueError:
                message = str(err)
            raise TandemError(f"the server said: {message}") from None
        except (urllib.error.URLError, OSError) as err:
            raise ServerUnreachableError(
                f"the server at {self.url} stopped answering: {err}"
            ) from None

    def load(self) -> None:
        """Have the server load the model now (ollama's empty request); its load time kept."""
        start = time.perf_counter()
        with self._post("/api/generate", {"model": self.name}) as resp:
            resp.read()
        self.load_seconds = time.perf_counter() - start

    def chat(self, messages: list[dict], options: dict, raw: bool) -> Generator[Piece, None, None]:
        body: dict = {"model": self.name, "messages": messages, "stream": True}
        if options:
            body["options"] = options
        if raw:
            prompt = "".join(m["content"] for m in messages if m["role"] == "user")
            body = {"model": self.name, "prompt": prompt, "raw": True, "stream": True}
            body.update({"options": options} if options else {})
        with self._post("/api/generate" if raw else "/api/chat", body) as resp:
            for line in resp:
                if not line.strip():
                    continue
                part = json.loads(line)
                if "error" in part:
                    raise TandemError(f"the server said: {part['error']}")
                text = (
                    part.get("response", "") if raw else part.get("message", {}).get("content", "")
                )
                if part.get("done"):
                    timings = Timings(
                        part.get("prompt_eval_count", 0),
                        part.get("prompt_eval_duration", 0) / 1e9,
                        part.get("eval_count", 0),
                        part.get("eval_duration", 0) / 1e9,
                    )
                    yield Piece(text, timings, part.get("load_duration", 0) / 1e9)
                    return
                yield Piece(text)

    def _show(self) -> dict:
        with self._post("/api/show", {"model": self.name}, timeout=30) as resp:
            return json.loads(resp.read())

    def info(self) -> dict:
        shown = self._show()
        details = shown.get("details", {})
        return {
            "architecture": details.get("family", "?"),
            "parameters": details.get("parameter_size", "?"),
            "quantization": details.get("quantization_level", "?"),
            "server": self.url,
        }

    def template(self) -> str:
        return self._show().get("template", "")

    def defaults(self) -> dict:
        out: dict = {}
        for line in self._show().get("parameters", "").splitlines():
            key, _, value = line.partition(" ")
            out[key] = value.strip()
        return out

    def system(self) -> str | None:
        return self._show().get("system") or None


def server_answers(url: str, timeout: float = 0.5) -> bool:
    """A tandem or ollama server answers at `url` (GET /api/version)."""
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=timeout) as resp:
            return "version" in json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
