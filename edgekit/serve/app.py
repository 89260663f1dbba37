"""The FastAPI application: endpoints by task, access control, request limits, metrics.

Endpoints follow the interfaces clients already speak: OpenAI's ``POST /v1/embeddings`` (feature-extraction),
``POST /v1/completions`` with server-sent events (text-generation) and ``GET /v1/models``; ``POST /v1/classify``
(text- and token-classification) is edgekit's own, documented in the README. ``GET /healthz`` (alive),
``GET /readyz`` (model loaded, verified, batching), ``GET /metrics`` (Prometheus) and ``GET /`` (a page to try
the model) complete it.

Access control, the body-size limit and the request metrics are plain ASGI middleware around the app, so that
they see every request, refused ones included, before FastAPI parses anything. Inputs are text that reaches
the tokenizer only: never a shell, a path or a template.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from importlib import resources
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from edgekit.serve.batching import Batcher, QueueFull
from edgekit.serve.completions import chunk, complete, prepare, response
from edgekit.serve.config import ServeConfig
from edgekit.serve.metrics import Metrics, endpoint_label
from edgekit.serve.model import ENCODER_ENDPOINTS, ServedModel

OPEN_PATHS = ("/healthz", "/")  # liveness and the static page (it holds no data; its requests carry the key)


# ---- request bodies -------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields (user, ...) that do not apply here
    model: Optional[str] = None


class EmbeddingsRequest(_Body):
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None


class ClassifyRequest(_Body):
    input: Union[str, list[str]]


class CompletionRequest(_Body):
    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=1)
    stream: bool = False
    temperature: Optional[float] = None
    n: int = 1
    stop: Union[str, list[str], None] = None


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers, self.reason = status, message, kind, headers or {}, reason


def _error_body(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind}}).encode()


# ---- ASGI middleware ------------------------------------------------------------------------------------------


async def _send_json(send, status: int, body: bytes, headers: dict | None = None) -> None:
    h = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    h += [(k.encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Outermost: every answer counted by endpoint and status, with its duration (a stream's: to its end)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint, t0, status = endpoint_label(scope["path"]), time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            self.metrics.duration.labels(endpoint=endpoint).observe(time.perf_counter() - t0)


class ApiKeys:
    """``Authorization: Bearer KEY`` against every key on file. Each comparison is of the two keys' SHA-256
    digests with ``hmac.compare_digest`` and all keys are always compared, so that neither a key's length nor
    which key matched shows in the time taken."""

    def __init__(self, app, keys: list[str], metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def allowed(self, header: bytes | None) -> bool:
        if not header or not header.startswith(b"Bearer "):
            return False
        given = hashlib.sha256(header[len(b"Bearer "):].strip()).digest()
        ok = False
        for d in self.digests:
            ok |= hmac.compare_digest(given, d)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if not self.allowed(dict(scope["headers"]).get(b"authorization")):
            self.metrics.rejected.labels(reason="unauthorized").inc()
            return await _send_json(send, 401, _error_body("a valid API key is required: send "
                                                           "'Authorization: Bearer KEY'", "authentication_error"),
                                    {"www-authenticate": "Bearer"})
        return await self.app(scope, receive, send)


class BodyLimit:
    """Bodies over ``limit`` bytes get 413 before they are parsed: by Content-Length, or while a chunked
    body is read (what was read is replayed to the app)."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def _too_large(self, send):
        self.metrics.rejected.labels(reason="too_large").inc()
        await _send_json(send, 413, _error_body(f"the request body is over the limit of {self.limit} bytes; send "
                                                "fewer or shorter texts", "invalid_request_error"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._too_large(send)
        body, replayed = b"".join(chunks), [False]

        async def replay():
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ---- the application ------------------------------------------------------------------------------------------


def read_api_keys(path) -> list[str]:
    from pathlib import Path

    from edgekit.errors import EdgekitError

    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgekitError(f"the API key file {p} could not be read ({e})", "give a text file with one key per line") from None
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not keys:
        raise EdgekitError(f"the API key file {p} holds no key", "write one key per line (lines starting with # are comments)")
    short = [k for k in keys if len(k) < 16]
    if short:
        raise EdgekitError(f"the API key file {p} holds {len(short)} key(s) shorter than 16 characters",
                           "use long random keys, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return keys


def model_labels(served: ServedModel) -> dict:
    s = served.summary()
    return {"name": served.name, "task": served.task, "verified": str(served.verified).lower(),
            "variant": served.variant if served.verified else "", "sha256": s.get("sha256") or "",
            "edgekit_version": s.get("edgekit_version") or "",
            "gate_passed": str((s.get("accuracy_gate") or {}).get("passed")).lower() if served.verified else ""}


class State:
    def __init__(self, served: ServedModel, cfg: ServeConfig):
        self.served, self.cfg = served, cfg
        self.metrics = Metrics(model_labels(served), served.bench_latency_s())
        max_batch = 1 if served.decoder else cfg.max_batch  # a completion streams on its own
        self.batcher = Batcher(self._compute, max_batch, cfg.max_wait_ms / 1000, cfg.max_queue, self.metrics.observe)
        self.ready = False
        self.created = int(time.time())

    def _compute(self, items, job):
        if self.served.decoder:
            return [complete(self.served, items[0], job)]
        return self.served.run_batch(items)


def create_app(served: ServedModel, cfg: ServeConfig, keys: list[str] | None = None):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

    state = State(served, cfg)

    @asynccontextmanager
    async def lifespan(app):
        state.batcher.start()
        state.ready = True
        yield
        state.ready = False  # uvicorn has stopped accepting: finish what is queued, then stop
        await state.batcher.stop()
        served.close()

    app = FastAPI(title="edgekit serve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.edgekit = state

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, e: HTTPProblem):
        if e.reason:
            state.metrics.rejected.labels(reason=e.reason).inc()
        return JSONResponse({"error": {"message": e.message, "type": e.kind}}, e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        state.metrics.rejected.labels(reason="bad_request").inc()
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return JSONResponse({"error": {"message": f"invalid request: {where}: {first.get('msg', 'not valid')}",
                                       "type": "invalid_request_error"}}, 400)

    def _only(task_ok: bool, endpoint: str):
        if not task_ok:
            right = ENCODER_ENDPOINTS[served.task]
            raise HTTPProblem(404, f"this server serves a {served.task} model, which answers at {right}, not {endpoint}",
                              "not_found_error")

    def _texts(value) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise HTTPProblem(400, "input is empty: give a string or a list of strings", reason="bad_request")
        if len(texts) > cfg.max_inputs:
            raise HTTPProblem(413, f"{len(texts)} inputs is over the limit of {cfg.max_inputs} per request; split "
                              "the request", reason="too_large")
        return texts

    def _submit(items: list, on_event=None):
        """Queue the request, or 429 with Retry-After when the queue is full."""
        try:
            return state.batcher.submit(items, on_event=on_event)
        except QueueFull as e:
            raise HTTPProblem(429, "the server is at capacity (queue full); retry later", "rate_limit_error",
                              {"Retry-After": str(e.retry_after_s)}, reason="queue_full") from None

    async def _run(items: list) -> list:
        tokens = sum(it.tokens for it in items)
        if tokens > cfg.max_tokens:
            raise HTTPProblem(413, f"{tokens} tokens is over the limit of {cfg.max_tokens} per request; split the "
                              "request", reason="too_large")
        job = _submit(items)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), cfg.request_timeout)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise HTTPProblem(504, f"the request took longer than {cfg.request_timeout:g} s", "timeout_error",
                              reason="timeout") from None
        except asyncio.CancelledError:  # the client went away: its place in the queue is given up
            job.cancelled = True
            raise

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        body = {"ready": state.ready, "verified": served.verified, "model": served.name}
        return JSONResponse(body, 200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics():
        data, content_type = state.metrics.exposition()
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": state.created,
                                            "owned_by": "edgekit", "edgekit": served.summary(),
                                            "limits": {"max_length": served.max_length, "max_inputs": cfg.max_inputs,
                                                       "max_tokens": cfg.max_tokens, "max_batch": cfg.max_batch}}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("edgekit.serve").joinpath("page.html").read_text(encoding="utf-8"))

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingsRequest):
        _only(served.task == "feature-extraction", "/v1/embeddings")
        if req.dimensions is not None:
            raise HTTPProblem(400, "dimensions is not supported: the model's embeddings are returned whole",
                              reason="bad_request")
        items = served.encode(_texts(req.input))
        vectors = await _run(items)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        n = sum(it.tokens for it in items)
        # JSONResponse directly: FastAPI's jsonable_encoder walks every float of every vector (measured: a large
        # part of a request's CPU); these are plain lists and dicts already
        return JSONResponse({"object": "list", "data": data, "model": served.name,
                             "usage": {"prompt_tokens": n, "total_tokens": n},
                             "truncated": [it.truncated for it in items]})

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        _only(served.task in ("text-classification", "token-classification"), "/v1/classify")
        items = served.encode(_texts(req.input))
        answers = await _run(items)
        return JSONResponse({"object": "list", "model": served.name, "task": served.task,
                             "data": [{"index": i, **a} for i, a in enumerate(answers)],
                             "usage": {"prompt_tokens": sum(it.tokens for it in items)}})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        _only(served.decoder, "/v1/completions")
        item = prepare(served, req, cfg, HTTPProblem)
        if not req.stream:
            (result,) = await _run([item])
            return response(served, item, result)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = _submit([item], on_event=lambda piece: loop.call_soon_threadsafe(events.put_nowait, piece))
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"

        async def stream():
            try:
                while True:
                    get = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait({get, job.future}, return_when=asyncio.FIRST_COMPLETED)
                    if get in done:
                        yield chunk(cid, served, get.result(), None)
                        continue
                    get.cancel()
                    while not events.empty():
                        yield chunk(cid, served, events.get_nowait(), None)
                    try:
                        (result,) = job.future.result()
                    except Exception as e:  # noqa: BLE001 - the status is sent: the error goes in the stream
                        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                        return
                    yield chunk(cid, served, "", result["finish_reason"])
                    yield "data: [DONE]\n\n"
                    return
            finally:
                job.cancelled = True  # a client that left stops the generation at its next token

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    wrapped = BodyLimit(app, cfg.max_request_bytes, state.metrics)
    if keys:
        wrapped = ApiKeys(wrapped, keys, state.metrics)
    outer = RequestMetrics(wrapped, state.metrics)
    outer.state = state  # for tests and the server: the app's state through the middleware
    outer.fastapi = app
    return outer


def _version() -> str:
    from edgekit.version import __version__

    return __version__
