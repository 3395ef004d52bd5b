"""``samtone serve``: the champion on Ray Serve, as an OpenAI-compatible embeddings API and top-k search.

One deployment (``Embedder``) with a FastAPI ingress. Each replica:

* checks every request's ``Host`` and API key before any route (``serve/auth.py``);
* tokenises each text once, cut to a bound from the max length, in one thread off the event loop;
* loads the model in the background (``/healthz`` answers at once, ``/readyz`` only once the model
  is loaded, a warm-up batch has run on both towers, and the index, if any, is built), and passes
  Serve's first health check only then: Serve routes no request to a replica still loading (one
  that replaces a lost replica, or scales up, would answer them 503);
* embeds every input of every request as its own item of a ``@serve.batch`` batch (sized in texts
  and in padded tokens), so one request of 100 texts and 100 requests of one text share batches;
* follows ``models:/NAME@ALIAS``: every ``serve.poll_interval_s`` seconds and on ``reconfigure``
  it re-resolves the alias; a new version is loaded beside the old one and swapped in atomically.
  Requests keep the model object they started with, so none fails and each reports its version.
  ``/search`` swaps model and index together, once the index for the new version is ready.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself in the route signatures
# of the Serve ingress class, or it takes `request` for a query parameter (422 on every call).
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from samtone_ray.core.config import ServeConfig
from samtone_ray.core.env import DEFAULTS as PROCESS_DEFAULTS
from samtone_ray.serve.api import (
    ApiError,
    Limits,
    check_body_size,
    check_content_type,
    check_declared_length,
    embeddings_response,
    error_body,
    parse_embeddings,
    parse_json,
    parse_search,
)
from samtone_ray.serve.auth import WILDCARD_BINDS, AccessPolicy
from samtone_ray.serve.replica import IndexSource, Served, load_model, with_index
from samtone_ray.tracking.model_uri import is_registry_uri

log = logging.getLogger(__name__)
DEPLOYMENT = "Embedder"
APP_NAME = "samtone"
RETRY_AFTER_S = "1"
FORWARD_TOKENS = 1024  # padded tokens per forward within a batch; see Embedder._embed_batch

app = FastAPI(
    title="samtone",
    description="OpenAI-compatible embeddings and top-k search with a SamToNe dual encoder",
)


class _ErrorResponse(JSONResponse):
    """Errors in ASCII JSON: a message that quotes a client's lone surrogate still renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def _error(exc: ApiError) -> JSONResponse:
    return _ErrorResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _ErrorResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = (exc.errors() or [{}])[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return _ErrorResponse(error_body(f"{param}: {first.get('msg', 'invalid request')}", param=param, code="invalid_value"), status_code=422)


class _Guard:
    """API key and Host checks before any route (``/docs`` and unknown paths included), as pure
    ASGI middleware; the policy is the replica's (``Embedder.access``)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            replica = serve.get_replica_context().servable_object
            headers = {k: v for k, v in scope["headers"] if k in (b"host", b"authorization")}
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):  # a route_prefix other than /
                path = path[len(root):] or "/"
            refusal = replica.access.refusal(
                scope["method"], path, _latin1(headers.get(b"host")), _latin1(headers.get(b"authorization"))
            )
            if refusal is not None:
                await replica._refused("access", refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _latin1(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


app.add_middleware(_Guard)


class FastJSONResponse(JSONResponse):
    """JSON written by orjson, numpy arrays included. For one 384-dim embedding that takes 16 us
    instead of json.dumps' 464 us on a list of floats, and 4.8 instead of 8.1 kB: float32 values
    go out in their shortest exact form, not as 17-digit doubles."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _schema(example: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}, "example": example}}}}


@dataclass(frozen=True)
class _Item:
    """One text of one request: the unit ``@serve.batch`` batches."""

    served: Served
    ids: list[int]
    input_type: str
    tokens: int  # len(ids), capped at max_batch_tokens
    scale: float  # max_batch_size / max_batch_tokens (0 = texts only); see _batch_cost


def _batch_cost(items: list[_Item]) -> int:
    """Ray's batch size, counting both texts and padded tokens (texts x longest) against one limit.

    With ``scale = max_batch_size / max_batch_tokens`` the cost stays <= max_batch_size exactly while
    the batch is within both limits."""
    texts = len(items)
    longest = max(i.tokens for i in items)
    return max(texts, int(np.ceil(texts * longest * items[0].scale - 1e-9)))


class _Metrics:
    """The project's own metrics (dashboards/README.md); Ray exports them with a ``ray_`` prefix."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.texts = metrics.Counter("samtone_serve_texts", "Texts embedded", tag_keys=("route", "input_type", "model_version"))
        self.tokens = metrics.Counter("samtone_serve_tokens", "Tokens embedded (after truncation)", tag_keys=("input_type", "model_version"))
        self.batch = metrics.Histogram(
            "samtone_serve_batch_texts", "Texts per forward batch", boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("model_version",)
        )
        self.errors = metrics.Counter("samtone_serve_errors", "Requests refused with a 4xx/5xx", tag_keys=("route", "status", "code"))
        self.version = metrics.Gauge("samtone_serve_model_version", "Registry version served", tag_keys=("model_name", "role"))
        self.swaps = metrics.Counter("samtone_serve_swaps", "Hot swaps done", tag_keys=("role",))
        self.pending = metrics.Gauge("samtone_serve_pending_texts", "Texts admitted and not yet embedded")
        self.index_docs = metrics.Gauge("samtone_serve_index_documents", "Documents in the /search index", tag_keys=("model_version",))

    def serving(self, served: Served, role: str) -> None:
        if served.version and served.version.isdigit():
            self.version.set(int(served.version), tags={"model_name": served.name, "role": role})


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=ServeConfig().max_ongoing_requests, health_check_period_s=5)
@serve.ingress(app)
class Embedder:
    def __init__(
        self, model: str, tracking_uri: str | None = None, index: str | None = None, device: str = "cpu", access: dict | None = None
    ) -> None:
        self.uri, self.tracking_uri, self.device = model, tracking_uri, device
        access = access or {}
        # Fails the replica (fail closed) when a key variable it was told to read is not set.
        self.access = AccessPolicy.build(access.get("api_key_sha256") or (), access.get("api_key_env"), access.get("trusted_hosts"))
        # One thread tokenises every request, off the event loop (the tokenizer copy is not thread-safe).
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="samtone-tokenize")
        self.index_source = IndexSource(index) if index else None
        self.cfg = ServeConfig()
        self.limits = Limits.of(self.cfg)
        self.embedder: Served | None = None  # what /v1/embeddings uses
        self.searcher: Served | None = None  # what /search uses: a model and the index it encoded
        self.load_error: str | None = None
        self.pending = 0
        self.metrics = _Metrics()
        self._check_now = asyncio.Event()
        self._first_load = asyncio.Event()  # set once the first load ended, loaded or failed
        self._swap_lock = asyncio.Lock()
        self._tasks = [asyncio.get_running_loop().create_task(self._follow())]

    # ------------------------------------------------------------------ loading and hot swap

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config: {serve: {...ServeConfig keys}}``; also re-checks the alias at once."""
        from samtone_ray.core.config import from_dict

        self.cfg = from_dict({"serve": dict(user_config.get("serve") or {})}).serve
        self.limits = Limits.of(self.cfg)
        self._embed_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._check_now.set()

    async def _follow(self) -> None:
        """Load the model, then follow the alias for as long as the replica lives."""
        while True:
            try:
                await self._check()
            except Exception as exc:  # a broken new version must not take the serving one down
                log.exception("checking %s failed", self.uri)
                if self.embedder is None:  # shown by /readyz: no file path of this machine in it
                    self.load_error = f"{type(exc).__name__}: {exc}".replace(self.uri, self._public_uri())
            self._first_load.set()
            with contextlib.suppress(asyncio.TimeoutError):
                wait = self.cfg.poll_interval_s if is_registry_uri(self.uri) and self.cfg.poll_interval_s else None
                await asyncio.wait_for(self._check_now.wait(), timeout=wait)
            self._check_now.clear()

    async def _check(self) -> None:
        async with self._swap_lock:
            from samtone_ray.tracking.model_uri import resolve_model

            current = self.embedder
            if current is not None:
                latest = await asyncio.to_thread(resolve_model, self.uri, self.tracking_uri)
                if latest.fingerprint == current.resolved.fingerprint:
                    if self.searcher is not current and self.index_source is not None:
                        await self._swap_search(current)  # a re-encoding job's index may have appeared
                    return
            new = await asyncio.to_thread(load_model, self.uri, self.tracking_uri, self.device, self.cfg.precision)
            if current is not None:
                log.info("alias moved: %s -> %s", current.resolved.label, new.resolved.label)
                self.metrics.swaps.inc(tags={"role": "embeddings"})
            if self.index_source is None:
                self.embedder = self.searcher = new
                self.metrics.serving(new, "embeddings")
                return
            if current is None:  # at start, the index is part of being ready
                self.embedder = self.searcher = await asyncio.to_thread(
                    with_index, new, self.index_source, self.cfg.precision, self.cfg.index_batch_size
                )
                self.metrics.serving(new, "embeddings")
                self.metrics.serving(new, "search")
                self.metrics.index_docs.set(len(self.searcher.index), tags={"model_version": str(new.version)})
                return
            # The corpus is encoded before the new model takes any request (its tokenizer is not
            # thread-safe); the old pair serves both routes meanwhile.
            if not await self._swap_search(new):
                self.embedder = new  # no index for it yet: /search stays on the old pair
                self.metrics.serving(new, "embeddings")

    async def _swap_search(self, new: Served) -> bool:
        """Give /search (and /v1/embeddings) the new model once its index exists; until then
        /search keeps the old pair. True when swapped."""
        try:
            paired = await asyncio.to_thread(with_index, new, self.index_source, self.cfg.precision, self.cfg.index_batch_size)
        except ValueError as exc:
            log.warning("/search stays on %s: %s", self.searcher.resolved.label, exc)
            return False
        self.embedder = self.searcher = paired
        self.metrics.serving(paired, "embeddings")
        self.metrics.serving(paired, "search")
        self.metrics.swaps.inc(tags={"role": "search"})
        self.metrics.index_docs.set(len(paired.index), tags={"model_version": str(paired.version)})
        return True

    def _ready(self, searching: bool = False) -> Served:
        served = self.searcher if searching else self.embedder
        if served is None:
            if self.load_error:
                raise ApiError(503, f"the model failed to load: {self.load_error}", type="server_error", code="model_load_failed")
            raise ApiError(503, "the model is loading", type="server_error", code="model_loading", headers={"Retry-After": RETRY_AFTER_S})
        return served

    # ------------------------------------------------------------------ batching

    @serve.batch(max_batch_size=ServeConfig().max_batch_size, batch_wait_timeout_s=ServeConfig().batch_wait_timeout_s, batch_size_fn=_batch_cost)
    async def _embed_batch(self, items: list[_Item]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(items)
        groups: dict[tuple[int, str], list[int]] = {}
        for i, item in enumerate(items):  # one forward per (model version, tower)
            groups.setdefault((id(item.served), item.input_type), []).append(i)
        for rows in groups.values():
            served, input_type = items[rows[0]].served, items[rows[0]].input_type
            ids = [items[i].ids for i in rows]
            # The batch runs as length-sorted forwards of at most FORWARD_TOKENS padded tokens:
            # 32 short queries stay one forward, 32 documents of mixed lengths become a few of
            # similar lengths instead of one padded to the longest.
            per_forward = max(1, FORWARD_TOKENS // max(items[i].tokens for i in rows))
            emb = await asyncio.to_thread(served.embed_ids, ids, input_type, self.cfg.precision, per_forward)
            for j, i in enumerate(rows):
                out[i] = emb[j].numpy()
            self.metrics.batch.observe(len(ids), tags={"model_version": str(served.version)})
        return out

    async def _embed(self, served: Served, texts: list[str], input_type: str, route: str) -> tuple[np.ndarray, int]:
        """Embeddings [N, D] of ``texts`` with ``served`` and their token count; 429 when the queue is full."""
        if self.pending + len(texts) > self.cfg.max_pending_texts:
            raise ApiError(
                429,
                f"the server is busy ({self.pending} texts queued, limit {self.cfg.max_pending_texts}); retry after {RETRY_AFTER_S} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        cfg = self.cfg
        scale = cfg.max_batch_size / cfg.max_batch_tokens if cfg.max_batch_tokens else 0.0
        self.pending += len(texts)
        self.metrics.pending.set(self.pending)
        try:
            # Tokenised once, in the tokenising thread: the count, the batch cost and the forward share it.
            ids = await asyncio.get_running_loop().run_in_executor(self._tokenizing, served.tokenize, texts, input_type)
            rows = await asyncio.gather(
                *(self._embed_batch(_Item(served, r, input_type, min(len(r), cfg.max_batch_tokens or len(r)), scale)) for r in ids)
            )
        finally:
            self.pending -= len(texts)
            self.metrics.pending.set(self.pending)
        tokens = sum(len(r) for r in ids)
        version = str(served.version)
        self.metrics.texts.inc(len(texts), tags={"route": route, "input_type": input_type, "model_version": version})
        self.metrics.tokens.inc(tokens, tags={"input_type": input_type, "model_version": version})
        return np.stack(rows), tokens

    # ------------------------------------------------------------------ HTTP

    async def _json(self, request: Request) -> dict[str, Any]:
        check_content_type(request.headers.get("content-type"))
        check_declared_length(request.headers.get("content-length"), self.limits)
        raw = bytearray()
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):
                async for chunk in request.stream():
                    raw += chunk
                    check_body_size(len(raw), self.limits)
        except TimeoutError:
            raise ApiError(
                408, f"the request body did not arrive within {self.cfg.body_timeout_s} s (serve.body_timeout_s)", code="body_timeout"
            ) from None
        return parse_json(bytes(raw))

    def _refused(self, route: str, exc: ApiError) -> JSONResponse:
        self.metrics.errors.inc(tags={"route": route, "status": str(exc.status), "code": str(exc.code)})
        return _error(exc)

    @app.post("/v1/embeddings", openapi_extra=_schema({"model": "samtone", "input": ["a text"], "encoding_format": "float", "input_type": "document"}))
    async def embeddings(self, request: Request) -> JSONResponse:
        """OpenAI-compatible embeddings; ``input_type`` (query|document) picks the tower."""
        try:
            served = self._ready()
            req = parse_embeddings(await self._json(request), self.limits, served.name, served.model.embedding_dim)
            vectors, tokens = await self._embed(served, req.texts, req.input_type, "embeddings")
        except ApiError as exc:
            return self._refused("embeddings", exc)
        return FastJSONResponse(embeddings_response(vectors, req.encoding_format, served.name, served.version, tokens))

    @app.post("/search", openapi_extra=_schema({"query": "how do I mount a disk", "top_k": 10}))
    async def search(self, request: Request) -> JSONResponse:
        """Top-k documents per query from the index encoded by the same model version as the queries."""
        try:
            served = self._ready(searching=True)
            if served.index is None:
                raise ApiError(404, "no index is served: start samtone serve with --index DIR", code="no_index")
            req = parse_search(await self._json(request), self.limits, served.name)
            vectors, _ = await self._embed(served, req.queries, "query", "search")
        except ApiError as exc:
            return self._refused("search", exc)
        import torch

        scores, rows = served.index.search(torch.from_numpy(vectors), req.top_k)
        idx = served.index
        results = [
            {"query": q, "hits": [{"id": idx.ids[r], "score": float(s), "title": idx.titles[r], "text": idx.texts[r]} for s, r in zip(ss.tolist(), rr.tolist())]}
            for q, ss, rr in zip(req.queries, scores, rows)
        ]
        return JSONResponse({"object": "list", "data": results, "model": served.name, "model_version": served.version})

    def _public_uri(self) -> str:
        """The model URI as clients may see it: a registry or run URI, never a path of this machine."""
        return self.uri if self.uri.startswith(("models:/", "runs:/")) else Path(self.uri.rstrip("/")).name

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        served = self.embedder
        data = []
        if served is not None:
            data.append(
                {
                    "id": served.name,
                    "object": "model",
                    "created": int(served.resolved.path.stat().st_mtime),
                    "owned_by": "samtone",
                    "version": served.version,
                    "uri": self._public_uri(),
                    "fingerprint": served.resolved.fingerprint,
                    "dimensions": served.model.embedding_dim,
                    "max_tokens": {"query": served.model.query_max_length, "document": served.model.doc_max_length},
                    "tower_mode": served.model.tower_mode,
                    "search_version": self.searcher.version if self.searcher else None,
                }
            )
        return JSONResponse({"object": "list", "data": data, "limits": asdict(self.limits)})

    @app.get("/info")
    async def info(self) -> JSONResponse:
        """Served versions, index, limits and batching settings."""
        searcher = self.searcher
        return JSONResponse(
            {
                "model": self._public_uri(),
                "embeddings_version": self.embedder.version if self.embedder else None,
                "search_version": searcher.version if searcher else None,
                "index_documents": len(searcher.index) if searcher and searcher.index is not None else 0,
                "limits": asdict(self.limits),
                "serve": asdict(self.cfg),
            }
        )

    async def check_health(self) -> None:
        """Serve's health check. Its first call gates the replica's first request, so it waits for
        the first load; a load that failed passes too (/readyz and every route then say why)."""
        await self._first_load.wait()

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """200 once the model is loaded, warmed up on both towers and its index (if any) is built."""
        try:
            served = self._ready()
        except ApiError as exc:
            return _error(exc)
        return JSONResponse({"status": "ready", "model": served.name, "version": served.version})


# ---------------------------------------------------------------------- building and running


def deployment_options(replicas: int | None = 1, autoscale: tuple[int, int] | None = None, gpu: bool = False, num_cpus: float = 1, serve_cfg: ServeConfig | None = None) -> dict[str, Any]:
    serve_cfg = serve_cfg or ServeConfig()
    options: dict[str, Any] = {
        "max_ongoing_requests": serve_cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": 1 if gpu else 0},
        "user_config": {"serve": asdict(serve_cfg)},
    }
    if autoscale:
        lo, hi = autoscale
        # Enough queued requests per replica that batches fill before another replica starts.
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": serve_cfg.max_batch_size}
    else:
        options["num_replicas"] = replicas
    return options


ACCESS_ARGS = ("api_key_sha256", "api_key_env", "trusted_hosts")


def build_app(args: dict[str, Any]):
    """Application builder for ``serve deploy`` / ``serve run``: ``import_path: samtone_ray.serve.app:build_app``.

    args: ``model`` (URI, required), ``tracking_uri``, ``index``, ``device`` (cpu|cuda), and who may
    call it: ``api_key_sha256`` (hex digests of the keys), ``api_key_env`` (the name of a variable
    of the replicas' environment holding keys: a Kubernetes secret), ``trusted_hosts`` (Host
    values; default: loopback names). No key given: no key asked. The deployment options come from
    the YAML's ``deployments`` entry. One parameter: Ray refuses a builder that takes more (even
    an optional one), which failed every ``serve deploy`` of the printed config."""
    return bind_app(args)


def bind_app(args: dict[str, Any], options: dict[str, Any] | None = None):
    """The application of ``build_app`` with deployment ``options``, for ``serve.run`` in process."""
    if not args.get("model"):
        raise ValueError("samtone_ray.serve.app:build_app needs args.model (a model URI)")
    deployment = Embedder.options(**options) if options else Embedder
    access = {k: args[k] for k in ACCESS_ARGS if args.get(k)}
    return deployment.bind(args["model"], args.get("tracking_uri") or None, args.get("index") or None, args.get("device", "cpu"), access)


def http_options(host: str, port: int, serve_cfg: ServeConfig) -> dict[str, Any]:
    """Serve's HTTP options: where to listen, and how long a request and an idle connection may last."""
    return {
        "host": host,
        "port": port,
        "request_timeout_s": serve_cfg.request_timeout_s,
        "keep_alive_timeout_s": serve_cfg.keep_alive_timeout_s,
    }


def serve_config(args: dict[str, Any], options: dict[str, Any], host: str = "127.0.0.1", port: int = 8000) -> dict[str, Any]:
    """The ``serve deploy`` YAML (ServeDeploySchema) for one samtone application.

    Its replicas get the environment the CLI gives those of a local ``samtone serve`` (env.DEFAULTS:
    a deployed replica's process is started by the cluster, not by the CLI); the ``RAY_*`` ones
    configure a cluster, which a deploy config does not start."""
    env_vars = {k: v for k, v in PROCESS_DEFAULTS.items() if not k.startswith("RAY_")}
    return {
        "proxy_location": "HeadOnly",
        "http_options": http_options(host, port, ServeConfig(**options["user_config"]["serve"])),
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "samtone_ray.serve.app:build_app",
                "runtime_env": {"env_vars": env_vars},
                "args": args,
                "deployments": [{"name": DEPLOYMENT, **options}],
            }
        ],
    }


def default_num_cpus(replicas: int | None, local: bool) -> float:
    """A lone replica on a local cluster started here gets the machine (2 torch threads did 1.24x
    the requests/s of 1 on 2 cores, direct ingress); replicas that share nodes, or a cluster's, get
    1 each."""
    return float(os.cpu_count() or 1) if local and replicas == 1 else 1.0


def local_serve_env(port: int, replicas: int | None) -> dict[str, str]:
    """Environment of a local cluster started for ``samtone serve``: Ray Serve's throughput-optimised
    mode, and with one replica, that replica listening on ``port`` itself.

    In that mode (Ray >= 2.55) the ingress replica runs its own HTTP server ("direct ingress"): a
    request no longer crosses the proxy actor, and the replica no longer fetches the body back from
    the proxy through actor calls. On 2 cores, one short query per request, 32 clients, that took
    the batched server from 49.8 to 162.9 requests/s (``benchmarks/README.md``). Several replicas
    keep the proxy on ``port`` to balance them; on a cluster an external load balancer (Ray's
    HAProxy ingress) plays that part and the operator sets these variables on every node.
    """
    env = {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # No load balancer drains a local replica: stop at once on Ctrl-C, and let a restarted
        # replica take its port back instead of waiting out HAProxy's quarantine.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }
    if replicas == 1:  # the range's end is exclusive: exactly `port`
        env |= {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port), "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1)}
    return env


def check_port_free(host: str, port: int) -> None:
    """A clear error now rather than a replica that retries a taken port forever."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot serve on {host}:{port}: {exc.strerror or exc} (is another server running there? use --port)") from exc


def run_blocking(app_args: dict[str, Any], options: dict[str, Any], host: str, port: int, local: bool, serve_cfg: ServeConfig | None = None) -> int:
    """Start the app, wait for /readyz, print the URL, block until Ctrl-C, then shut down.

    On a local cluster started here (``local``: ``starts_local_cluster()``) with one replica, that replica answers on ``port`` itself
    (``local_serve_env``) and Serve's proxy takes a spare loopback port; elsewhere the proxy
    answers on ``port``."""
    import json
    import urllib.error
    import urllib.request

    import ray

    from samtone_ray.core.runtime import connect_ray, free_loopback_port

    try:
        check_port_free(host, port)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    proxy_port = port
    if local:
        replicas = options.get("num_replicas")
        os.environ.update(local_serve_env(port, replicas))
        if replicas == 1:
            proxy_port = free_loopback_port()
    connect_ray()

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        serve.start(http_options=http_options(host, proxy_port, serve_cfg or ServeConfig()))
        serve.run(bind_app(app_args, options), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{host}:{port}"
        probe = f"http://127.0.0.1:{port}" if host in WILDCARD_BINDS else url  # a Host always trusted
        while True:  # the model loads (and the index is encoded) in the replica, in the background
            try:
                with urllib.request.urlopen(f"{probe}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError as exc:
                error = json.loads(exc.read() or b"{}").get("error") or {}
                if error.get("code") == "model_load_failed":
                    print(f"error: {error['message']}", file=sys.stderr, flush=True)
                    return 2
            except OSError:
                pass
            time.sleep(0.5)
        keys = len(app_args.get("api_key_sha256") or ())
        auth = f"{keys} API key{'s' if keys > 1 else ''}" if keys else "no API key"
        print(f"serving {app_args['model']} at {url}  ({auth}; OpenAPI: {url}/docs; Ctrl-C stops)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
