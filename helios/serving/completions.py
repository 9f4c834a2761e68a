"""POST /v1/completions: the legacy completions endpoint (text, texts or token ids; `n`, `echo`, `logprobs`).

    curl 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \
         -d '{"model": "helios", "prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0}'

Logprobs use the legacy shape (`text_offset/token_logprobs/tokens/top_logprobs`); in a stream they come with each
choice's final chunk. Checks, limits and tokenization: helios/serving/frontend.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from helios.serving.core import GenerationOutput, PromptSource
from helios.serving.errors import APIError
from helios.serving.frontend import Frontend, stream_error
from helios.serving.protocol import (
    CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse, CompletionStreamResponse, UsageInfo,
    random_id,
)
from helios.serving.text import RenderedLogprobs

ENDPOINT = "/v1/completions"


def completion_logprobs(entries: RenderedLogprobs | None, offset: int = 0) -> CompletionLogProbs | None:
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


def usage(outputs: list[GenerationOutput]) -> UsageInfo:
    prompt, completion = sum(o.prompt_tokens for o in outputs), sum(len(o.token_ids) for o in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse(payload: Any) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class CompletionHandler:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    def sources(self, body: CompletionRequest) -> tuple[list[PromptSource], list[str] | None]:
        texts = body.prompt_texts()
        if texts is not None:
            if not texts or len(texts) > self.frontend.limits.max_prompts:
                raise APIError(400, f"prompt must hold 1..{self.frontend.limits.max_prompts} strings", "prompt",
                               "invalid_value")
            return [PromptSource(text=t) for t in texts], texts
        if not body.prompt:
            raise APIError(400, "the prompt is empty", "prompt", "empty_prompt")
        return [PromptSource(token_ids=tuple(int(t) for t in body.prompt))], None  # type: ignore[union-attr]

    async def __call__(self, body: CompletionRequest) -> Any:
        started = time.perf_counter()
        f = self.frontend
        f.check_open()
        f.check_model(body.model)
        max_tokens = f.check_max_tokens(body.max_tokens, "max_tokens")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported; valid: echo=false or "
                                "logprobs=null", "echo", "unsupported")
        sampling = [f.sampling_params(body, body.logprobs, i) for i in range(max(body.n, 1))]
        stop = f.check_stop(body.stop_strings())
        sources, texts = self.sources(body)
        f.check_count(len(sources), body.n)
        prefix = [t if body.echo else "" for t in (texts or [""] * len(sources)) for _ in sampling]
        submission = await f.submit(sources, max_tokens=max_tokens, stop=stop, sampling=sampling, stream=body.stream)
        model = f.served_model_name
        if not body.stream:
            outputs = await f.results(submission)
            f.metrics.request_latency.labels(ENDPOINT).observe(time.perf_counter() - started)
            return CompletionResponse(model=model, usage=usage(outputs), system_fingerprint=outputs[0].arm,
                                      choices=[CompletionChoice(index=i, text=prefix[i] + o.text,
                                                                logprobs=completion_logprobs(o.logprobs),
                                                                finish_reason=o.finish_reason)  # type: ignore[arg-type]
                                               for i, o in enumerate(outputs)])
        rid, created = random_id("cmpl"), int(time.time())

        def chunk(index: int, text: str, finish: str | None = None, logprobs: CompletionLogProbs | None = None) -> str:
            return sse(CompletionStreamResponse(id=rid, created=created, model=model, choices=[
                CompletionChoice(index=index, text=text, finish_reason=finish,  # type: ignore[arg-type]
                                 logprobs=logprobs)]))

        async def stream() -> AsyncIterator[str]:
            outputs: list[GenerationOutput] = []
            for i, text in enumerate(prefix):
                if text:
                    yield chunk(i, text)
            async for index, kind, payload in f.events(submission):
                if kind == "piece":
                    yield chunk(index, payload)
                elif kind == "end":
                    outputs.append(payload)
                    yield chunk(index, "", payload.finish_reason, completion_logprobs(payload.logprobs))
                else:
                    yield f"data: {json.dumps(stream_error(payload))}\n\n"
            if body.stream_options and body.stream_options.include_usage:
                yield sse(CompletionStreamResponse(id=rid, created=created, model=model, choices=[],
                                                   usage=usage(outputs)))
            yield "data: [DONE]\n\n"
            f.metrics.request_latency.labels(ENDPOINT).observe(time.perf_counter() - started)

        return StreamingResponse(stream(), media_type="text/event-stream")
