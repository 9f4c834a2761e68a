"""POST /v1/chat/completions: chat messages through the tokenizer's chat template (a plain transcript without one).

    curl 127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \
         -d '{"model": "helios", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}'

Logprobs: `logprobs: true` + `top_logprobs` (0..20) in chat's `content[]` shape; in a stream, with each choice's
final chunk. Checks, limits and tokenization (the template runs off the engine's thread): helios/serving/frontend.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from helios.sampling import MAX_LOGPROBS
from helios.serving.completions import sse, usage
from helios.serving.core import GenerationOutput, PromptSource
from helios.serving.errors import APIError
from helios.serving.frontend import Frontend, stream_error
from helios.serving.protocol import (
    ChatCompletionChoice, ChatCompletionLogProbs, ChatCompletionRequest, ChatCompletionResponse,
    ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChatLogProb, ChatLogProbsContent, ChatResponseMessage,
    DeltaMessage, random_id,
)
from helios.serving.text import RenderedLogprobs

ENDPOINT = "/v1/chat/completions"


def chat_logprobs(entries: RenderedLogprobs | None) -> ChatCompletionLogProbs | None:
    if entries is None:
        return None
    return ChatCompletionLogProbs(content=[
        ChatLogProbsContent(token=text, logprob=logprob, bytes=list(text.encode()), top_logprobs=[
            ChatLogProb(token=alt, logprob=alt_lp, bytes=list(alt.encode())) for alt, alt_lp in top])
        for text, logprob, top in entries])


class ChatHandler:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def __call__(self, body: ChatCompletionRequest) -> Any:
        started = time.perf_counter()
        f = self.frontend
        f.check_open()
        f.check_model(body.model)
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
            if isinstance(body.top_logprobs, bool) or not 0 <= body.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be an integer in 0..{MAX_LOGPROBS}; got {body.top_logprobs}",
                               "top_logprobs", "invalid_value")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling = [f.sampling_params(body, logprobs, i) for i in range(max(body.n, 1))]
        f.check_count(1, body.n)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = f.check_max_tokens(body.max_completion_tokens if body.max_completion_tokens is not None
                                        else body.max_tokens, param)
        stop = f.check_stop(body.stop_strings())
        source = PromptSource(messages=tuple({"role": m.role, "content": m.text()} for m in body.messages))
        submission = await f.submit([source], max_tokens=max_tokens, stop=stop, sampling=sampling, stream=body.stream)
        model = f.served_model_name
        if not body.stream:
            outputs = await f.results(submission)
            f.metrics.request_latency.labels(ENDPOINT).observe(time.perf_counter() - started)
            choices = [ChatCompletionChoice(index=i, message=ChatResponseMessage(content=o.text),
                                            logprobs=chat_logprobs(o.logprobs),
                                            finish_reason=o.finish_reason)  # type: ignore[arg-type]
                       for i, o in enumerate(outputs)]
            return ChatCompletionResponse(model=model, usage=usage(outputs), system_fingerprint=outputs[0].arm,
                                          choices=choices)
        rid, created, arm = random_id("chatcmpl"), int(time.time()), f.core.arm.label

        def chunk(index: int, delta: DeltaMessage, finish: str | None = None,
                  logprobs: ChatCompletionLogProbs | None = None) -> str:
            return sse(ChatCompletionStreamResponse(id=rid, created=created, model=model, system_fingerprint=arm,
                                                    choices=[ChatCompletionStreamChoice(
                                                        index=index, delta=delta, finish_reason=finish,  # type: ignore[arg-type]
                                                        logprobs=logprobs)]))

        async def stream() -> AsyncIterator[str]:
            for index in range(len(submission.seqs)):
                yield chunk(index, DeltaMessage(role="assistant", content=""))
            outputs: list[GenerationOutput] = []
            async for index, kind, payload in f.events(submission):
                if kind == "piece":
                    yield chunk(index, DeltaMessage(content=payload))
                elif kind == "end":
                    outputs.append(payload)
                    yield chunk(index, DeltaMessage(), payload.finish_reason, chat_logprobs(payload.logprobs))
                else:
                    yield f"data: {json.dumps(stream_error(payload))}\n\n"
            if outputs and body.stream_options and body.stream_options.include_usage:
                yield sse(ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=[],
                                                       usage=usage(outputs)))
            yield "data: [DONE]\n\n"
            f.metrics.request_latency.labels(ENDPOINT).observe(time.perf_counter() - started)

        return StreamingResponse(stream(), media_type="text/event-stream")
