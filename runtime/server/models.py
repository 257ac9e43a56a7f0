"""ModelRegistry: the models a server holds — name -> LoadedModel + Engine — loaded on first
request in a worker thread, kept for a keep-alive time after their last request (ollama's
rule: default 5 minutes, a negative value forever, 0 unloads when the request ends), and
listed by /api/ps and `tandem ps`.

The registry lives on the event loop; only loading and unloading run in threads. A model
that several requests ask for at once is loaded once (one asyncio.Lock per name).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modelfiles.names import ModelName
from runtime.engine import Engine, EngineOptions
from runtime.loaded_model import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    lm: LoadedModel
    engine: Engine
    loaded_at: float  # time.time()
    keep_alive: float  # seconds after the last request; math.inf: forever
    last_used: float = field(default_factory=time.time)
    active: int = 0  # requests in flight

    @property
    def num_ctx(self) -> int:
        return self.engine.options.num_ctx

    @property
    def expires_at(self) -> float:
        return self.last_used + self.keep_alive

    @property
    def size(self) -> int:
        """Bytes held: the weights file plus the KV pool."""
        return self.lm.gguf.file_size + self.engine.stats().kv_bytes

    @property
    def size_vram(self) -> int:
        """Bytes on the GPU: the weights placed there and the GPU layers' KV pages."""
        devices = self.lm.model.devices
        if not devices.uses_gpu or devices.gpu.type != "cuda":
            return 0
        tensors = self.lm.gguf.tensors
        weights = sum(
            tensors[n].nbytes
            for n, where in devices.tensors.items()
            if where == "gpu" and n in tensors
        )
        return weights + self.engine.core.pool.nbytes_on(devices.gpu)

    def expired(self, now: float) -> bool:
        return self.active == 0 and now >= self.expires_at


@dataclass(frozen=True)
class RegistryOptions:
    num_ctx: int = 4096  # used when a Modelfile sets no num_ctx
    max_num_seqs: int = 16
    keep_alive: float = 300.0  # seconds
    kv_cache_type: str = "f16"  # or "q8_0"


def normalize(ref: str) -> str:
    """The registry key of a model reference: a .gguf path as given, a name as `name:tag`
    (so "smollm2", "SmolLM2" and "smollm2:latest" share one loaded copy)."""
    if Path(ref).expanduser().is_file():
        return ref
    name = ModelName.maybe(ref)
    return str(name) if name is not None else ref


class ModelRegistry:
    def __init__(
        self,
        options: RegistryOptions | None = None,
        loader: Callable[[str], LoadedModel] = LoadedModel.load,
    ) -> None:
        self.options = options or RegistryOptions()
        self._loader = loader
        self._models: dict[str, ServedModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._guard = threading.Lock()  # _models is read from scrape and ps handlers too

    def loaded(self) -> list[ServedModel]:
        with self._guard:
            return list(self._models.values())

    def find(self, name: str) -> ServedModel | None:
        with self._guard:
            return self._models.get(normalize(name))

    async def get(self, name: str, keep_alive: float | None = None) -> tuple[ServedModel, float]:
        """The served model (counted as in use until `release`) and the seconds this call
        spent loading it (0 when it was already loaded)."""
        key = normalize(name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            served, seconds = self.find(key), 0.0
            if served is None:
                start = time.perf_counter()
                try:
                    served = await asyncio.to_thread(self._load, key)
                except BaseException:
                    self._locks.pop(key, None)  # keep no lock for names that never load
                    raise
                seconds = time.perf_counter() - start
                with self._guard:
                    self._models[key] = served
        if keep_alive is not None:
            served.keep_alive = keep_alive
        served.active += 1
        served.last_used = time.time()
        return served, seconds

    def _load(self, name: str) -> ServedModel:
        lm = self._loader(name)
        wanted = lm.parameters.get("num_ctx") or self.options.num_ctx
        num_ctx = min(int(wanted), lm.config.n_ctx_train)
        engine = Engine(
            lm,
            EngineOptions(
                num_ctx=num_ctx,
                max_num_seqs=self.options.max_num_seqs,
                kv_cache_type=self.options.kv_cache_type,
            ),
        )
        log.info("loaded %s (%s, num_ctx %d) in %.2fs", name, lm.path, num_ctx, lm.load_seconds)
        return ServedModel(name, lm, engine, time.time(), self.options.keep_alive)

    def release(self, served: ServedModel) -> None:
        """A request on `served` ended: its keep-alive clock starts now."""
        served.active -= 1
        served.last_used = time.time()

    async def unload_expired(self) -> list[str]:
        now = time.time()
        with self._guard:
            gone = [k for k, m in self._models.items() if m.expired(now)]
            models = [self._models.pop(k) for k in gone]
        for served in models:
            await asyncio.to_thread(served.engine.close)
            log.info("unloaded %s", served.name)
        return gone

    async def close(self) -> None:
        with self._guard:
            models, self._models = list(self._models.values()), {}
        for served in models:
            await asyncio.to_thread(served.engine.close)
