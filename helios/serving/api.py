"""The OpenAI-compatible HTTP API (FastAPI): routes, middleware and error mapping only.

    python scripts/serve.py candidate=tiny-llama      # then: curl 127.0.0.1:8000/v1/models

Layout (as vLLM's entrypoints): schemas in protocol.py, one handler per endpoint (completions.py, chat.py), what
they share in frontend.py (checks, limits, tokenization off the engine's thread), the engine worker in core.py and
the policy loop in controller.py. This module wires them:

  GET  /health               200 {"status": "ok", arm, queue, running}; 503 once draining or if the worker died
  GET  /metrics              Prometheus text (helios/serving/metrics.py)
  GET  /v1/models            the one served model
  POST /v1/completions       completions.CompletionHandler
  POST /v1/chat/completions  chat.ChatHandler

Middleware (pure ASGI, so streams and disconnects pass through untouched): Bearer key on /v1/* (401), the body-size
limit (413 from Content-Length before the body is read; a chunked body is counted as it arrives), and a request
counter by endpoint and status. Every error is an OpenAI body {"error": {"message", "type", "param", "code"}}:
malformed JSON and schema violations are 400 (OpenAI's status), never 422 or 5xx.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from helios.serving.chat import ChatHandler
from helios.serving.completions import CompletionHandler
from helios.serving.controller import Controller
from helios.serving.core import ServingCore
from helios.serving.errors import APIError, error_response
from helios.serving.frontend import Frontend
from helios.serving.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from helios.serving.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})
DISCARD_FACTOR = 8  # a body over the limit is read and dropped up to 8x the limit (so the client sees its 413)


class Gate:
    """API key, body-size limit and request counting around the app (module docstring)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, metrics: ServerMetrics,
                 api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.metrics, self.api_key, self.max_body_bytes = app, metrics, api_key, int(max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"  # not the raw path: unbounded label values
        status = ["500"]

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            if self.api_key is not None and path.startswith("/v1/"):
                headers = dict(scope.get("headers") or [])
                given = headers.get(b"authorization", b"")
                if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):  # constant time
                    await error_response(401, "Incorrect API key provided.", None, "invalid_api_key")(
                        scope, receive, counted_send)
                    return
            receive = await self._limit_body(scope, receive, counted_send)
            if receive is None:
                return
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(endpoint, status[0]).inc()

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: str, more: bool) -> None:
        self.metrics.rejections.labels("body_too_large").inc()
        discarded = 0
        while more and discarded <= DISCARD_FACTOR * self.max_body_bytes:  # drop the rest, bounded, not kept
            message = await receive()
            if message["type"] != "http.request":
                break
            discarded += len(message.get("body", b""))
            more = message.get("more_body", False)
        await error_response(413, f"the request body ({size}) exceeds the server's limit of {self.max_body_bytes} "
                                  "bytes (max_body_bytes)", None, "request_too_large")(scope, receive, send)

    async def _limit_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """`receive` unchanged when the declared length fits; a replay of the buffered body for a chunked one that
        fits; None after answering 413."""
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length > self.max_body_bytes:
                await self._too_large(scope, receive, send, f"{length} bytes", True)
                return None
            return receive  # the HTTP layer holds the client to its Content-Length
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send, f"over {self.max_body_bytes} bytes, chunked", more)
                return None
            chunks.append(body)
            if not more:
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return replay


def create_app(core: ServingCore, controller: Controller, frontend: Frontend, metrics: ServerMetrics, *,
               api_key: str | None = None, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The app. Startup starts the engine worker and the controller; shutdown (after uvicorn has waited for the
    in-flight requests) stops admitting, stops the controller, serves whatever is left and stops the worker."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not core.alive:
            core.start()
        controller.start()
        yield
        core.begin_drain()
        controller.stop()
        await asyncio.to_thread(core.stop)  # serves whatever is still queued, off the event loop
        frontend.close()
        if on_shutdown is not None:  # here, not after uvicorn.run: uvicorn re-raises SIGTERM once it has shut down
            on_shutdown()

    app = FastAPI(title="helios", lifespan=lifespan)
    app.state.core, app.state.controller, app.state.frontend, app.state.metrics = core, controller, frontend, metrics
    app.add_middleware(Gate, metrics=metrics, api_key=api_key,  # type: ignore[arg-type]
                       max_body_bytes=frontend.limits.max_body_bytes)
    completions, chat = CompletionHandler(frontend), ChatHandler(frontend)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI reports malformed JSON, missing fields and wrong types here; OpenAI answers all of them with 400.
        first = error.errors()[0] if error.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"We could not parse the JSON body of your request: {first.get('msg')}",
                                  None, "invalid_json")
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param,
                              first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), None, None)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not core.alive:
            return error_response(503, "the engine worker is not running", None, "worker_dead")
        body = {"status": "draining" if core.draining else "ok", "arm": core.arm.to_dict(), "queue": core.queue_len,
                "running": core.running}
        return JSONResponse(body, status_code=503 if core.draining else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=frontend.served_model_name)])

    @app.post("/v1/completions", response_model=None)
    async def create_completion(body: CompletionRequest) -> Any:
        return await completions(body)

    @app.post("/v1/chat/completions", response_model=None)
    async def create_chat_completion(body: ChatCompletionRequest) -> Any:
        return await chat(body)

    return app
