"""tandem on Ray Serve: many replicas of tandem's own server behind one OpenAI/ollama
endpoint, routed by prompt prefix (issue 19). Needs the `tandem[ray]` extra.

    TandemEngine   a Serve deployment; each replica holds tandem's complete FastAPI app
                   (create_app: ModelRegistry -> LoadedModel + Engine, the OpenAI and ollama
                   routers unchanged) with --model preloaded, and answers one forwarded HTTP
                   request as a stream: first {"status", "headers"}, then body chunks.
                   `ray_actor_options` num_cpus = its threads. Its responses carry
                   x-tandem-replica (the Serve replica id) and x-tandem-prefix-cache-hits (the
                   replica's prompt tokens served from its prefix cache so far).
    TandemIngress  the HTTP ingress (`@serve.ingress`): forwards every request through a
                   streaming deployment handle; answers 503 itself when more than
                   `max_inflight` requests are in flight (the per-replica queue bound times the
                   replicas), and when the replica serving a request dies (a clear 5xx, never
                   a hang). /health reports the engine replicas' states from Serve.
    PrefixAffinityRouter  the engine handle's request router: a request whose prompt starts
                   like an earlier one (affinity_key) goes to the replica that served it, unless
                   that replica's queue is more than `load_bound` longer than the shortest;
                   then to the least-loaded replica (which then owns the prefix).

Started by `tandem serve --ray` (run_on_ray) or `serve run runtime.server.ray_app:app
model=smollm2 replicas=2` (the builder `app(args)`); see docs/ray.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from quant.errors import InvalidParameterError
from runtime.server.address import DEFAULT_HOST, DEFAULT_PORT
from runtime.server.app import create_app
from runtime.server.errors import HTTPStatusError, error_for_path
from runtime.server.guard import GuardOptions
from runtime.server.models import RegistryOptions
from runtime.server.ray_metrics import create_board, merge, post_forever

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-tandem-replica"
PREFIX_HITS_HEADER = "x-tandem-prefix-cache-hits"
PREFIX_CHARS = 2048  # the affinity key hashes at most this much of the prompt's start
AFFINITY_ENTRIES = 100_000  # prefixes remembered by the router (least recently used go)
ENGINE = "TandemEngine"
HOP_HEADERS = {"content-length", "transfer-encoding", "connection"}


@dataclass
class RayOptions:
    """How the Serve application is laid out (the builder's and `--ray`'s arguments)."""

    model: str
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, or fixed `replicas`
    threads: int = 1  # each replica's engine threads; also its num_cpus unless num_cpus is set
    num_cpus: float | None = None
    num_gpus: float = 0.0
    load_bound: int = 2  # an affine replica may be this many requests longer than the shortest
    router: str = "prefix"  # a key of ROUTERS
    queue_per_replica: int = 64  # in-flight requests per replica before the ingress says 503
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    guard: GuardOptions = field(default_factory=GuardOptions)


def affinity_key(path: str, body: bytes) -> str | None:
    """A hash of the start of the request's prompt: for chat (OpenAI or ollama) the messages
    up to and including the first user message (so later turns of a conversation share the
    first turn's key); for completions/generate the first PREFIX_CHARS of system + prompt.
    None when the body has no prompt (the request then goes to the least-loaded replica)."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    messages = data.get("messages")
    if isinstance(messages, list) and messages:
        head = []
        for message in messages:
            head.append(message)
            if isinstance(message, dict) and message.get("role") == "user":
                break
        text = json.dumps(head, sort_keys=True, default=str)
    elif isinstance(data.get("prompt"), str | list):
        text = json.dumps([data.get("system"), data["prompt"]], default=str)
    else:
        return None
    model = str(data.get("model", ""))
    return hashlib.sha256(f"{path}\0{model}\0{text[:PREFIX_CHARS]}".encode()).hexdigest()[:32]


class PrefixAffinityRouter(RequestRouter):
    """Prefix-hash affinity with a load bound, falling back to least-loaded (vLLM's Ray
    Serve LLM routes the same way, with a prefix tree where this keeps one hash). Among
    equally loaded replicas a new prefix goes to the one owning the fewest, so sessions
    spread evenly."""

    def initialize_state(self, load_bound: int = 2, **kwargs) -> None:
        self.load_bound = load_bound
        self.owner: OrderedDict[str, ReplicaID] = OrderedDict()  # affinity key -> replica
        self.owned: Counter[ReplicaID] = Counter()  # how many keys each replica owns

    def _load(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def _rank(self, replica: RunningReplica) -> tuple[int, int]:
        return self._load(replica), self.owned[replica.replica_id]

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ranked = sorted(candidate_replicas, key=self._rank)
        key = pending_request.kwargs.get("affinity") if pending_request else None
        owner = self.owner.get(key) if key else None
        for replica in ranked:
            if replica.replica_id == owner:
                if self._load(replica) <= self._load(ranked[0]) + self.load_bound:
                    return [[replica], [r for r in ranked if r is not replica]]
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        key = pending_request.kwargs.get("affinity")
        if not key:
            return
        previous = self.owner.get(key)
        if previous != replica_id:
            if previous is not None:
                self.owned[previous] -= 1
            self.owned[replica_id] += 1
        self.owner[key] = replica_id
        self.owner.move_to_end(key)
        while len(self.owner) > AFFINITY_ENTRIES:
            self.owned[self.owner.popitem(last=False)[1]] -= 1


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in turn, whatever its prompt: the baseline the prefix
    affinity is measured against (`--router round-robin`, docs/ray.md)."""

    def initialize_state(self, **kwargs) -> None:
        self.turn = 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not ordered:
            return []
        self.turn = (self.turn + 1) % len(ordered)
        return [[r] for r in ordered[self.turn :] + ordered[: self.turn]]


ROUTERS = {"prefix": PrefixAffinityRouter, "round-robin": RoundRobinRouter}


class TandemEngine:
    """One replica: tandem's whole server (create_app) with the model preloaded; it is ready
    (and Serve routes to it) once the model has loaded."""

    async def __init__(self, options: RayOptions, app_name: str = "tandem") -> None:
        self.app = create_app(options.registry, preload=options.model, guard=options.guard)
        self.state = self.app.state.tandem
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.lifespan = contextlib.AsyncExitStack()
        await self.lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        while not self.state.ready and not self.state.preload_error:
            await asyncio.sleep(0.05)
        if self.state.preload_error:
            raise RuntimeError(f"could not load {options.model}: {self.state.preload_error}")
        self.poster = asyncio.create_task(post_forever(app_name, self.replica, self.metrics))

    def metrics(self) -> str:
        """This replica's /metrics text (ray_metrics merges the replicas')."""
        engines = [(m.name, m.engine.stats()) for m in self.state.registry.loaded()]
        return self.state.metrics.render(engines)

    def check_health(self) -> None:
        if self.state.preload_error or not self.state.ready:
            raise RuntimeError(f"replica {self.replica}: model not loaded")

    def prefix_cache_hits(self) -> int:
        return sum(m.engine.stats().prefix_cache_hits_total for m in self.state.registry.loaded())

    async def __call__(
        self, method: str, path: str, query: bytes, headers: list, body: bytes, affinity=None
    ) -> AsyncIterator[Any]:
        """Run one HTTP request through the app: yields {"status", "headers"}, then bytes."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }
        sent: asyncio.Queue[dict] = asyncio.Queue()
        done = asyncio.Event()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            await sent.put(message)

        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: sent.put_nowait({"type": "tandem.end"}))
        try:
            while True:
                message = await sent.get()
                if message["type"] == "http.response.start":
                    head = [
                        (k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]
                    ]
                    head += [(REPLICA_HEADER, self.replica)]
                    head += [(PREFIX_HITS_HEADER, str(self.prefix_cache_hits()))]
                    yield {"status": message["status"], "headers": head}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
                elif message["type"] == "tandem.end":
                    break
        finally:
            done.set()  # the client went away or the response ended: let the app finish
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def __del__(self) -> None:
        """Serve's graceful shutdown: close the engines (the app's lifespan exit)."""
        if poster := getattr(self, "poster", None):
            poster.cancel()
        await self.lifespan.aclose()


ingress_app = FastAPI(title="tandem on Ray Serve")
_INGRESS: list[TandemIngress] = []


class TandemIngress:
    """The endpoint: every path of tandem's API, forwarded to an engine replica."""

    def __init__(self, engine: DeploymentHandle, max_inflight: int, app_name: str) -> None:
        self.engine = engine.options(stream=True)
        self.max_inflight = max_inflight
        self.inflight = 0
        self.app_name = app_name
        self.board = create_board(app_name)
        _INGRESS[:] = [self]  # the app-level routes below reach this replica's instance

    async def health(self) -> JSONResponse:
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.app_name)
        deployment = app.deployments.get(ENGINE) if app else None
        states = {str(k): v for k, v in (deployment.replica_states if deployment else {}).items()}
        running = states.get("RUNNING", 0)
        body = {"status": "ok" if running else "unavailable", "replicas": states}
        return JSONResponse(body, 200 if running else 503)

    async def metrics(self) -> Response:
        texts = await self.board.fresh.remote()  # type: ignore[attr-defined]
        return Response(merge(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def forward(self, request: Request) -> Response:
        path = request.url.path
        if self.inflight >= self.max_inflight:
            busy = HTTPStatusError(503, f"all replicas are busy ({self.inflight} in flight)")
            return error_for_path(path, busy)
        self.inflight += 1
        try:
            body = await request.body()
            headers = [(k, v) for k, v in request.headers.items()]
            stream = self.engine.remote(
                request.method,
                path,
                request.url.query.encode(),
                headers,
                body,
                affinity=affinity_key(path, body),
            )
            head = await stream.__anext__()  # type: ignore[attr-defined]  (stream=True)
        except (RayError, StopAsyncIteration) as err:
            self.inflight -= 1
            log.warning("replica failed before answering %s: %s", path, err)
            failed = HTTPStatusError(503, "the replica serving this request failed; retry")
            return error_for_path(path, failed)
        except BaseException:
            self.inflight -= 1
            raise
        out = [(k, v) for k, v in head["headers"] if k.lower() not in HOP_HEADERS]
        response = StreamingResponse(self._rest(stream, out), status_code=head["status"])
        response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out]
        return response

    async def _rest(self, stream, headers: list) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        except RayError as err:
            log.warning("replica died mid-stream: %s", err)
            yield _stream_error(headers)
        finally:
            self.inflight -= 1


@ingress_app.get("/health")
async def _health(request: Request) -> JSONResponse:
    return await _INGRESS[0].health()


@ingress_app.get("/metrics")
async def _metrics(request: Request) -> Response:
    return await _INGRESS[0].metrics()


@ingress_app.api_route(
    "/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
)
async def _forward(request: Request) -> Response:
    return await _INGRESS[0].forward(request)


def _stream_error(headers: list) -> bytes:
    """The error a stream ends with when its replica dies, in the stream's own framing."""
    kind = next((v for k, v in headers if k.lower() == "content-type"), "")
    error = "the replica serving this request failed mid-stream; retry"
    if "event-stream" in kind:
        return f"data: {json.dumps({'error': {'message': error, 'type': 'server_error'}})}\n\n".encode()
    return (json.dumps({"error": error}) + "\n").encode()


def build(options: RayOptions, app_name: str = "tandem"):
    """The Serve application: TandemIngress in front of the TandemEngine replicas."""
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.autoscale:
        low, high = options.autoscale
        target = max(1, options.registry.max_num_seqs)
        scaling = {
            "autoscaling_config": {
                "min_replicas": low,
                "max_replicas": high,
                "target_ongoing_requests": target,
            }
        }
    cpus = options.num_cpus if options.num_cpus is not None else float(options.threads)
    engine = serve.deployment(
        TandemEngine,
        name=ENGINE,
        ray_actor_options={"num_cpus": cpus, "num_gpus": options.num_gpus},
        max_ongoing_requests=options.queue_per_replica,
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=20,
        request_router_config=router_config(options),
        **scaling,
    )
    most = options.autoscale[1] if options.autoscale else options.replicas
    ingress = serve.deployment(serve.ingress(ingress_app)(TandemIngress), name="TandemIngress")
    engines = engine.bind(options, app_name)  # type: ignore[attr-defined]
    ingress = ingress.options(ray_actor_options={"num_cpus": 0})  # type: ignore[attr-defined]
    return ingress.bind(engines, most * options.queue_per_replica, app_name)


def router_config(options: RayOptions) -> RequestRouterConfig:
    if options.router not in ROUTERS:
        known = ", ".join(ROUTERS)
        raise InvalidParameterError(f"router {options.router!r}: give one of {known}")
    kwargs = {"load_bound": options.load_bound} if options.router == "prefix" else {}
    return RequestRouterConfig(
        request_router_class=f"{__name__}:{ROUTERS[options.router].__name__}",  # type: ignore[arg-type]
        request_router_kwargs=kwargs,
    )


def parse_autoscale(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit() or not 1 <= int(low) <= int(high):
        raise InvalidParameterError(f"--autoscale {text}: give MIN:MAX with 1 <= MIN <= MAX")
    return int(low), int(high)


def app(args: dict[str, str]):
    """`serve run runtime.server.ray_app:app model=M [replicas=N | autoscale=MIN:MAX]
    [threads=T] [num_cpus=C] [num_ctx=N] [parallel=N] [load_bound=B] [router=prefix|round-robin]`."""
    if "model" not in args:
        raise InvalidParameterError("give model=NAME (a stored model, or a .gguf path)")
    threads = int(args.get("threads", 1))
    registry = RegistryOptions(keep_alive=float("inf"), load=(("num_thread", threads),))
    if "num_ctx" in args:
        registry = dataclasses.replace(registry, num_ctx=int(args["num_ctx"]))
    if "parallel" in args:
        registry = dataclasses.replace(registry, max_num_seqs=int(args["parallel"]))
    options = RayOptions(
        model=args["model"],
        replicas=int(args.get("replicas", 1)),
        autoscale=parse_autoscale(args["autoscale"]) if "autoscale" in args else None,
        threads=threads,
        num_cpus=float(args["num_cpus"]) if "num_cpus" in args else None,
        load_bound=int(args.get("load_bound", 2)),
        router=args.get("router", "prefix"),
        registry=registry,
        guard=GuardOptions(bind_host=args.get("host", "0.0.0.0")),
    )
    return build(options)


def run_on_ray(options: RayOptions, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """`tandem serve --ray`: join RAY_ADDRESS's cluster (or start a local one), serve until
    SIGINT/SIGTERM, then shut the application down (Serve drains the replicas)."""
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), namespace="tandem")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(options), name="tandem", route_prefix="/")
    log.info("tandem on Ray Serve at http://%s:%d (%s)", host, port, options.model)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete("tandem")
    serve.shutdown()
    ray.shutdown()
