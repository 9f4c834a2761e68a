"""The OpenAI-compatible HTTP API (FastAPI): handlers only; schemas in protocol.py, the engine behind batcher.py.

    python scripts/serve.py policy=exports/ucb      # then: curl 127.0.0.1:8000/v1/models

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events),
GET /v1/models, GET /health, GET /metrics (Prometheus text). Every error is an OpenAI-style body
{"error": {"message", "type", "param", "code"}} with a 4xx status: bad JSON, schema violations, bad `max_tokens`,
prompts over the context window, unknown models and a missing/wrong API key are the client's fault, never a 5xx.

Streaming is incremental: the engine calls back after every decode step and the worker sends each token's text as
soon as it is final (whole characters only, never text that may still turn into a stop string), so the first chunk
leaves after the prefill, not after the batch. The response starts only once the worker has accepted the prompt,
so a prompt over the context window is still a 400, not a broken stream.

Sampling: each request becomes one SamplingParams per choice (`n` choices per prompt, choice i seeded with seed + i
when a seed is given), validated here so that a bad value is a 400 naming its valid range. Logprobs are rendered
in OpenAI's shapes (legacy `text_offset/token_logprobs/tokens/top_logprobs` on completions, `content[]` on chat);
in a stream they come with each choice's final chunk (the text is streamed as it is decoded, the logprobs are read
from the device once the batch ends).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from helios.sampling import MAX_LOGPROBS, SamplingParams
from helios.serving.batcher import Batcher, GenerationOutput, GenerationRequest, RequestError
from helios.serving.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from helios.serving.protocol import (
    ChatCompletionChoice, ChatCompletionLogProbs, ChatCompletionRequest, ChatCompletionResponse,
    ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChatLogProb, ChatLogProbsContent, ChatResponseMessage,
    CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse, CompletionStreamResponse,
    DeltaMessage, ErrorInfo, ErrorResponse, ModelCard, ModelList, SamplingFields, UsageInfo, random_id,
)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"),
                                         param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def sampling_params(body: SamplingFields, logprobs: int | None, choice: int) -> SamplingParams:
    """Choice `choice`'s decoding settings; a value out of range is a 400 naming the parameter and its range."""
    seed = None if body.seed is None else body.seed + choice
    try:
        return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p,
                              top_k=0 if body.top_k is None else body.top_k, seed=seed, logprobs=logprobs)
    except ValueError as error:  # SamplingParams' messages start with the parameter's name
        raise APIError(400, str(error), str(error).split()[0], "invalid_value") from error


def completion_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]] | None,
                        offset: int = 0) -> CompletionLogProbs | None:
    """The legacy shape; `top_logprobs` holds the chosen token beside its alternatives (as OpenAI and vLLM do)."""
    if entries is None:
        return None
    out = CompletionLogProbs()
    for text, logprob, top in entries:
        out.text_offset.append(offset)
        offset += len(text)
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        # Keyed by text, so tokens that decode alike (e.g. lone bytes of a multi-byte character, all U+FFFD) share
        # one key: the most likely of them keeps it (a limit of the legacy shape; chat's list has no such collision).
        alternatives: dict[str, float] = {}
        for alt, alt_lp in [*top, (text, logprob)]:
            alternatives.setdefault(alt, alt_lp)
        out.top_logprobs.append(alternatives)
    return out


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]] | None) -> ChatCompletionLogProbs | None:
    if entries is None:
        return None
    return ChatCompletionLogProbs(content=[
        ChatLogProbsContent(token=text, logprob=logprob, bytes=list(text.encode()), top_logprobs=[
            ChatLogProb(token=alt, logprob=alt_lp, bytes=list(alt.encode())) for alt, alt_lp in top])
        for text, logprob, top in entries])


def create_app(batcher: Batcher, metrics: ServerMetrics, *, served_model_name: str = "helios",
               api_key: str | None = None, default_max_tokens: int = 16, max_prompts: int = 64,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The app. The batcher is started on startup and drained on shutdown (uvicorn's SIGTERM handling waits for
    in-flight requests first, then runs the shutdown, so nothing queued is dropped)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not batcher.alive:
            batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)  # serves whatever is still queued, off the event loop
        if on_shutdown is not None:  # here, not after uvicorn.run: uvicorn re-raises SIGTERM once it has shut down
            on_shutdown()

    app = FastAPI(title="helios", lifespan=lifespan)
    app.state.batcher, app.state.metrics = batcher, metrics

    # ------------------------------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code)

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

    @app.middleware("http")
    async def _count(request: Request, call_next):  # type: ignore[no-untyped-def]
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):  # constant time: no timing oracle
                metrics.requests.labels("/v1/*", "401").inc()  # not the raw path: unbounded label values
                return error_response(401, "Incorrect API key provided.", None, "invalid_api_key")
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    # ------------------------------------------------------------------------------------------ helpers

    def check_model(model: str) -> None:
        if model != served_model_name:
            raise APIError(404, f"The model `{model}` does not exist. Available: {served_model_name}", "model",
                           "model_not_found")

    def check_max_tokens(value: int | None, param: str) -> int:
        if value is None:
            return default_max_tokens
        if value < 1:
            raise APIError(400, f"{param} must be at least 1; got {value}", param, "invalid_value")
        if value >= batcher.max_context:
            raise APIError(400, f"{param} ({value}) must be smaller than the context window of "
                                f"{batcher.max_context} tokens", param, "context_length_exceeded")
        return value

    async def generate(**fields: Any) -> GenerationOutput:
        loop = asyncio.get_running_loop()
        request = GenerationRequest(future=loop.create_future(), loop=loop, **fields)
        try:
            batcher.submit(request)
        except RuntimeError as error:
            raise APIError(503, str(error), None, "shutting_down") from error
        try:
            return await request.future
        except RequestError as error:
            raise APIError(400, str(error), error.param, error.code) from error
        except asyncio.CancelledError:
            request.future.cancel()  # the worker skips it if it has not started
            raise

    def sse(payload: Any) -> str:
        return f"data: {payload.model_dump_json()}\n\n"

    async def open_stream(jobs: list[dict[str, Any]]) -> tuple[asyncio.Queue, list[GenerationRequest], list]:
        """Submit streaming requests sharing one event queue; return once the worker has accepted all of them
        (or raise the 4xx of the first it refused), with any events that arrived meanwhile."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        requests = [GenerationRequest(future=loop.create_future(), loop=loop, stream=events, stream_index=i, **job)
                    for i, job in enumerate(jobs)]
        early: list = []
        try:
            for request in requests:
                batcher.submit(request)
            started = 0
            while started < len(requests):
                event = await events.get()
                if event[1] == "start":
                    started += 1
                elif event[1] == "error":
                    error = event[2]
                    if isinstance(error, RequestError):
                        raise APIError(400, str(error), error.param, error.code) from error
                    raise error
                else:
                    early.append(event)
        except RuntimeError as error:
            close_stream(requests)
            raise APIError(503, str(error), None, "shutting_down") from error
        except BaseException:
            close_stream(requests)
            raise
        return events, requests, early

    def close_stream(requests: list[GenerationRequest]) -> None:
        for request in requests:  # the worker skips queued ones; a running batch finishes without this client
            request.future.cancel()

    async def stream_events(events: asyncio.Queue, early: list, count: int) -> AsyncIterator[tuple[int, str, Any]]:
        """The pieces and ends of `count` streaming requests, in the order the worker produced them."""
        ended = 0
        while ended < count:
            event = early.pop(0) if early else await events.get()
            yield event
            if event[1] == "end":
                ended += 1
            elif event[1] == "error":
                return

    def stream_error(error: BaseException) -> str:
        body = ErrorResponse(error=ErrorInfo(message=str(error) or type(error).__name__, type="server_error"))
        return f"data: {body.model_dump_json()}\n\n"

    def usage(outputs: list[GenerationOutput]) -> UsageInfo:
        prompt, completion = sum(o.prompt_tokens for o in outputs), sum(len(o.token_ids) for o in outputs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def check_count(jobs: int, prompts: int, n: int) -> None:
        if n < 1:
            raise APIError(400, f"n must be at least 1; got {n}", "n", "invalid_value")
        if jobs > max_prompts:
            raise APIError(400, f"prompts x n must be at most {max_prompts}; got {prompts} x {n}", "n",
                           "invalid_value")

    # ------------------------------------------------------------------------------------------ endpoints

    @app.get("/health")
    async def health() -> JSONResponse:
        if not batcher.alive:
            return error_response(503, "the batcher worker is not running", None, "worker_dead")
        return JSONResponse({"status": "ok", "arm": batcher.arm.to_dict(), "queue": batcher.queue.qsize()})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=served_model_name)])

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Any:
        started = time.perf_counter()
        check_model(body.model)
        max_tokens = check_max_tokens(body.max_tokens, "max_tokens")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported; valid: echo=false or "
                                "logprobs=null", "echo", "unsupported")
        sampling = [sampling_params(body, body.logprobs, i) for i in range(max(body.n, 1))]
        texts = body.prompt_texts()
        if texts is not None:
            if not texts or len(texts) > max_prompts:
                raise APIError(400, f"prompt must hold 1..{max_prompts} strings", "prompt", "invalid_value")
            prompts: list[dict[str, Any]] = [dict(prompt=t) for t in texts]
        else:
            if not body.prompt:
                raise APIError(400, "the prompt is empty", "prompt", "empty_prompt")
            prompts = [dict(prompt_ids=[int(t) for t in body.prompt])]  # type: ignore[union-attr]
        check_count(len(prompts) * body.n, len(prompts), body.n)
        # OpenAI's order: choice index = prompt index x n + i.
        jobs = [dict(**p, max_tokens=max_tokens, stop=body.stop_strings(), sampling=params)
                for p in prompts for params in sampling]
        prefix = [t if body.echo else "" for t in (texts or [""] * len(prompts)) for _ in sampling]
        if not body.stream:
            outputs: list[GenerationOutput] = list(await asyncio.gather(*(generate(**job) for job in jobs)))
            metrics.request_latency.labels("/v1/completions").observe(time.perf_counter() - started)
            total = UsageInfo(prompt_tokens=sum(o.prompt_tokens for o in outputs),
                              completion_tokens=sum(len(o.token_ids) for o in outputs))
            total.total_tokens = total.prompt_tokens + total.completion_tokens
            return CompletionResponse(model=served_model_name, usage=total, system_fingerprint=outputs[0].arm,
                                      choices=[CompletionChoice(index=i, text=prefix[i] + o.text,
                                                                logprobs=completion_logprobs(o.logprobs),
                                                                finish_reason=o.finish_reason)  # type: ignore[arg-type]
                                               for i, o in enumerate(outputs)])
        events, requests, early = await open_stream(jobs)
        rid, created = random_id("cmpl"), int(time.time())

        def chunk(index: int, text: str, finish: str | None = None, logprobs: CompletionLogProbs | None = None) -> str:
            return sse(CompletionStreamResponse(id=rid, created=created, model=served_model_name, choices=[
                CompletionChoice(index=index, text=text, finish_reason=finish,  # type: ignore[arg-type]
                                 logprobs=logprobs)]))

        async def stream() -> AsyncIterator[str]:
            prompt_tokens = completion_tokens = 0
            try:
                for i, text in enumerate(prefix):
                    if text:
                        yield chunk(i, text)
                async for index, kind, payload in stream_events(events, early, len(requests)):
                    if kind == "piece":
                        yield chunk(index, payload)
                    elif kind == "end":
                        prompt_tokens += payload.prompt_tokens
                        completion_tokens += len(payload.token_ids)
                        yield chunk(index, "", payload.finish_reason, completion_logprobs(payload.logprobs))
                    else:
                        yield stream_error(payload)
                if body.stream_options and body.stream_options.include_usage:
                    yield sse(CompletionStreamResponse(id=rid, created=created, model=served_model_name, choices=[],
                                                       usage=UsageInfo(prompt_tokens=prompt_tokens,
                                                                       completion_tokens=completion_tokens,
                                                                       total_tokens=prompt_tokens + completion_tokens)))
                yield "data: [DONE]\n\n"
                metrics.request_latency.labels("/v1/completions").observe(time.perf_counter() - started)
            finally:
                close_stream(requests)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        started = time.perf_counter()
        check_model(body.model)
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
            if isinstance(body.top_logprobs, bool) or not 0 <= body.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be an integer in 0..{MAX_LOGPROBS}; got {body.top_logprobs}",
                               "top_logprobs", "invalid_value")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling = [sampling_params(body, logprobs, i) for i in range(max(body.n, 1))]
        check_count(body.n, 1, body.n)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = check_max_tokens(body.max_completion_tokens if body.max_completion_tokens is not None
                                      else body.max_tokens, param)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        jobs = [dict(messages=messages, max_tokens=max_tokens, stop=body.stop_strings(), sampling=params)
                for params in sampling]
        if not body.stream:
            outputs: list[GenerationOutput] = list(await asyncio.gather(*(generate(**job) for job in jobs)))
            metrics.request_latency.labels("/v1/chat/completions").observe(time.perf_counter() - started)
            choices = [ChatCompletionChoice(index=i, message=ChatResponseMessage(content=o.text),
                                            logprobs=chat_logprobs(o.logprobs),
                                            finish_reason=o.finish_reason)  # type: ignore[arg-type]
                       for i, o in enumerate(outputs)]
            return ChatCompletionResponse(model=served_model_name, usage=usage(outputs),
                                          system_fingerprint=outputs[0].arm, choices=choices)
        events, requests, early = await open_stream(jobs)
        rid, created, arm = random_id("chatcmpl"), int(time.time()), batcher.arm.label

        def chunk(index: int, delta: DeltaMessage, finish: str | None = None,
                  logprobs: ChatCompletionLogProbs | None = None) -> str:
            return sse(ChatCompletionStreamResponse(id=rid, created=created, model=served_model_name,
                                                    system_fingerprint=arm, choices=[
                    ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=finish,  # type: ignore[arg-type]
                                               logprobs=logprobs)]))

        async def stream() -> AsyncIterator[str]:
            try:
                for index in range(len(jobs)):
                    yield chunk(index, DeltaMessage(role="assistant", content=""))
                outputs: list[GenerationOutput] = []
                async for index, kind, payload in stream_events(events, early, len(jobs)):
                    if kind == "piece":
                        yield chunk(index, DeltaMessage(content=payload))
                    elif kind == "end":
                        outputs.append(payload)
                        yield chunk(index, DeltaMessage(), payload.finish_reason, chat_logprobs(payload.logprobs))
                    else:
                        yield stream_error(payload)
                if outputs and body.stream_options and body.stream_options.include_usage:
                    yield sse(ChatCompletionStreamResponse(id=rid, created=created, model=served_model_name,
                                                           choices=[], usage=usage(outputs)))
                yield "data: [DONE]\n\n"
                metrics.request_latency.labels("/v1/chat/completions").observe(time.perf_counter() - started)
            finally:
                close_stream(requests)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app

