"""ModelRegistry: the models a server holds — name -> LoadedModel + Engine — loaded on first
request in a worker thread, kept for a keep-alive time after their last request (ollama's
rule: default 5 minutes, a negative value forever, 0 unloads when the request ends), and
listed by /api/ps and `tandem ps`.

The registry lives on the event loop; only loading and unloading run in threads. A model
that several requests ask for at once is loaded once (one asyncio.Lock per name).

What a client may name (`reference`): a stored model; a model another tool keeps (ollama's
store, the Hugging Face cache, LM Studio: modelfiles/local_stores.py); a pullable one only once pulled
(unless --allow-pull); a .gguf path only under a --models-dir (or one already loaded, e.g.
by --model). Paths are canonical (realpath: `/./`, `..` and symlinks neither escape a
directory nor load a second copy), and a refused path gets the same answer whether or not
anything is there. At most `max_loaded` models are held: loading another unloads the least
recently used idle one, and when every one is busy the request gets a 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loaders.hf_pull import is_hf_ref
from loaders.pull import known_key, pulled_path
from modelfiles import local_stores
from modelfiles.hf_models import stored_name
from modelfiles.names import ModelName
from modelfiles.parameters import default
from modelfiles.store import Store
from quant.errors import GGUFError, InvalidParameterError, ModelNotFoundError, QueueFullError
from runtime.engine.engine import Engine
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
    admitted: int = 0  # samples submitted to the engine whose last event has not come back

    @property
    def num_ctx(self) -> int:
        return self.engine.options.num_ctx

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (server/limits.py bounds prompts by it)."""
        return self.lm.tokenizer.max_token_chars

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
        return weights + self.engine.core.runner.kv_bytes_on(devices.gpu)

    def expired(self, now: float) -> bool:
        return self.active == 0 and now >= self.expires_at


@dataclass(frozen=True)
class RegistryOptions:
    num_ctx: int = default("num_ctx")  # used when a Modelfile sets no num_ctx
    max_num_seqs: int = default("max_num_seqs")
    keep_alive: float = 300.0  # seconds
    kv_cache_type: str = default("kv_cache_type")  # or "q8_0"
    max_waiting: int = 512  # samples admitted per model (running or queued); more get 503
    max_loaded: int = 3  # models held at once (the least recently used idle one goes)
    models_dirs: tuple[str, ...] = ()  # where client-named .gguf paths may lie
    allow_pull: bool = False  # may a request pull a pullable model that is not here yet
    load: tuple[tuple[str, int], ...] = ()  # serve's num_gpu, num_thread, gpu_memory flags

    def __post_init__(self) -> None:
        for name in ("max_waiting", "max_loaded"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}")

    def settings(self) -> dict:
        """The flags every model this server loads starts from (a Modelfile overrides them),
        checked: InvalidParameterError says which is wrong."""
        from runtime.run_options import RunOptions

        base = {
            "num_ctx": self.num_ctx,
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_type": self.kv_cache_type,
            **dict(self.load),
        }
        RunOptions.resolve(base=base)
        return base


def looks_like_path(ref: str) -> bool:
    return "/" in ref or "\\" in ref or ref.startswith((".", "~")) or ref.lower().endswith(".gguf")


def canonical_path(ref: str) -> str | None:
    """realpath of `ref` (~ expanded), or None when it cannot name a file (a NUL byte)."""
    try:
        return os.path.realpath(os.path.expanduser(ref))
    except (ValueError, OSError):
        return None


def normalize(ref: str) -> str:
    """The registry key of a model reference: a path as its realpath, a name as `name:tag`
    (so "smollm2", "SmolLM2" and "smollm2:latest" share one loaded copy, as do "a/./m.gguf"
    and "a/m.gguf")."""
    text = ref.strip()
    if looks_like_path(text):
        return canonical_path(text) or text
    name = ModelName.maybe(text)
    return str(name) if name is not None else text


def named_elsewhere(text: str) -> str | None:
    """The key of a model named like a path that is none: `hf.co/user/repo:quant` in tandem's
    store, or a model another tool keeps (modelfiles/local_stores.py; tandem's store first)."""
    if is_hf_ref(text):
        name = stored_name(text)
        if Store().get(name) is not None:
            return str(name)
    elif (name := ModelName.maybe(text)) is not None and Store().get(name) is not None:
        return str(name) if "/" in name.name else None  # `ns/name:tag` pulled from a registry
    local = local_stores.find(text)
    return local.name if local is not None else None


def _under(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


class ModelRegistry:
    def __init__(
        self,
        options: RegistryOptions | None = None,
        loader: Callable[[str], LoadedModel] | None = None,
    ) -> None:
        self.options = options or RegistryOptions()
        self._loader = loader or self._load_model
        self._models: dict[str, ServedModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loading = 0  # loads under way (each holds a place among max_loaded)
        self._guard = threading.Lock()  # _models is read from scrape and ps handlers too
        self._dirs = [p for d in self.options.models_dirs if (p := canonical_path(d))]

    def loaded(self) -> list[ServedModel]:
        with self._guard:
            return list(self._models.values())

    def find(self, name: str) -> ServedModel | None:
        with self._guard:
            return self._models.get(normalize(name))

    def reference(self, ref: str, trusted: bool = False) -> str:
        """The registry key of what a client named, if the server may serve it (see the
        module's docstring); ModelNotFoundError else. `trusted`: the operator named it
        (--model), so any path or pullable name goes."""
        text = ref.strip()
        key = normalize(text)
        if trusted or self.find(key) is not None:
            return key
        elsewhere = named_elsewhere(text)
        if elsewhere is not None:
            return elsewhere
        if looks_like_path(text):
            real = canonical_path(text)
            if real is not None and any(_under(real, d) for d in self._dirs):
                return real
            # the same answer whether or not the file exists, whatever it holds
            raise ModelNotFoundError(
                f"model {text[:200]!r} is not served here: name a stored model (GET /api/tags), "
                "or a .gguf file under a directory the server was started with --models-dir"
            )
        name = ModelName.maybe(text)
        if (
            name is not None
            and not self.options.allow_pull
            and (pull_key := known_key(name.name, name.tag)) is not None
            and pulled_path(pull_key) is None
            and Store().get(name) is None
        ):
            raise ModelNotFoundError(
                f"model {key!r} is not pulled yet; run `tandem pull {pull_key}` (or start "
                "the server with --allow-pull to let requests pull it)"
            )
        if self._loader == self._load_model and (
            name is None or (Store().get(name) is None and known_key(name.name, name.tag) is None)
        ):
            # refused before a place is reserved: an unknown name must not unload a model
            raise ModelNotFoundError(
                f"model {text[:200]!r} not found: name a stored model (GET /api/tags, "
                "`tandem list`) or a pullable one"
            )
        return key

    async def get(
        self, name: str, keep_alive: float | None = None, trusted: bool = False
    ) -> tuple[ServedModel, float]:
        """The served model (counted as in use until `release`) and the seconds this call
        spent loading it (0 when it was already loaded). Refuses what `reference` refuses;
        QueueFullError when max_loaded models are held and all are busy."""
        key = self.reference(name, trusted)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            served, seconds = self.find(key), 0.0
            if served is None:
                start = time.perf_counter()
                try:
                    victim = self._reserve()
                    try:
                        if victim is not None:
                            await asyncio.to_thread(victim.engine.close)
                            log.info("unloaded %s to make room", victim.name)
                        served = await asyncio.to_thread(self._load, key, trusted)
                    finally:
                        self._loading -= 1
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

    def _reserve(self) -> ServedModel | None:
        """Take a place for one more model (on the loop, no await: check and take are one
        step); → the least recently used idle model, removed to make that place, if one
        had to go."""
        with self._guard:
            victim = None
            if len(self._models) + self._loading >= self.options.max_loaded:
                idle = [m for m in self._models.values() if m.active == 0]
                if not idle:
                    raise QueueFullError(
                        f"{len(self._models) + self._loading} models are loaded and all are "
                        "busy; retry shortly (or start the server with a larger "
                        "--max-loaded-models)",
                        retry_after=5,
                    )
                victim = min(idle, key=lambda m: m.last_used)
                del self._models[victim.name]
            self._loading += 1
        return victim

    def _load_model(self, name: str) -> LoadedModel:
        """The default loader: the server's flags are the defaults the Modelfile overrides."""
        return LoadedModel.load(name, base=self.options.settings())

    def _load(self, name: str, trusted: bool = True) -> ServedModel:
        try:
            lm = self._loader(name)
        except GGUFError as err:
            if trusted:
                raise
            # a client named this file: say nothing of what it holds (the log has it)
            log.warning("could not load %s: %s", name, err)
            raise GGUFError(
                f"{name} is not a usable GGUF model file (the server's log says why)"
            ) from None
        num_ctx = lm.options.num_ctx  # the server's flags ▸ the Modelfile ▸ n_ctx_train
        engine = Engine(lm, lm.options.engine_options(max_waiting=self.options.max_waiting))
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

    async def unload(self, name: str) -> bool:
        """Unload `name` now if it is loaded and idle (else once its requests end: its
        keep-alive becomes 0); False when it is not loaded (a name never served included)."""
        key = normalize(name.strip())
        with self._guard:
            served = self._models.get(key)
            if served is None:
                return False
            served.keep_alive = 0.0
            if served.active:
                return True
            del self._models[key]
        await asyncio.to_thread(served.engine.close)
        log.info("unloaded %s", served.name)
        return True

    async def close(self) -> None:
        with self._guard:
            models, self._models = list(self._models.values()), {}
        for served in models:
            await asyncio.to_thread(served.engine.close)
