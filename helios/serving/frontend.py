"""What every generation endpoint shares: validation, limits, tokenization off the engine's thread, submission.

    python -m pytest -q tests/test_serving.py -k "poisoned or large_prompt or queue"

A request goes through, in order (each step fails this request alone, with an OpenAI error body):
  1. 503 + Retry-After while the server drains (SIGTERM);
  2. parameter checks (model, max_tokens, sampling, n, stop strings: 400 naming the valid values);
  3. the prompt-length pre-check: a prompt of c characters needs at least ceil(c / k) tokens, k being the most
     characters one token of the current arm's tokenizer stands for, so a prompt that cannot fit the context window
     is a 400 before any tokenizer call (a 10 MB prompt costs its JSON parse, never a tokenization);
  4. backpressure: room for its sequences (n per prompt) among the `max_queued_sequences` that may wait for their
     first token, else 429 with Retry-After;
  5. tokenization / chat template in a small thread pool (`tokenizer_threads`), never on the event loop nor on the
     engine's worker; any exception there (a lone surrogate, a template that rejects the messages) is a 400;
  6. the exact context check and the memory budget check (400), then `ServingCore.submit`.
The body-size limit (413) comes before all of this, in the app's middleware (helios/serving/api.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from helios.sampling import SamplingParams
from helios.serving.core import (
    Event, GenerationOutput, PromptSource, SequenceError, ServedSequence, ServingCore,
)
from helios.serving.errors import APIError
from helios.serving.metrics import ServerMetrics
from helios.serving.protocol import SamplingFields
from helios.serving.text import min_prompt_tokens


@dataclasses.dataclass(frozen=True)
class Limits:
    """The server's request limits (conf/serve.yaml)."""

    max_body_bytes: int = 4 * 2**20  # larger bodies: 413 before they are read
    max_prompts: int = 64  # prompts x n per request
    max_stop_strings: int = 4  # as OpenAI
    max_stop_chars: int = 256  # per stop string
    retry_after_s: int = 1  # Retry-After of 429 (queue full) and 503 (draining)
    tokenizer_threads: int = 2


@dataclasses.dataclass
class Submission:
    """The sequences of one request (prompt-major: choice index = prompt index x n + i) and, when streamed, the
    queue their events arrive on."""

    seqs: list[ServedSequence]
    events: asyncio.Queue | None


class Frontend:
    def __init__(self, core: ServingCore, metrics: ServerMetrics, *, served_model_name: str = "helios",
                 default_max_tokens: int = 16, limits: Limits = Limits()) -> None:
        self.core, self.metrics = core, metrics
        self.served_model_name, self.default_max_tokens, self.limits = served_model_name, int(default_max_tokens), limits
        self.pool = ThreadPoolExecutor(limits.tokenizer_threads, thread_name_prefix="helios-tokenize")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------ checks

    def reject(self, reason: str, status: int, message: str, param: str | None, code: str,
               headers: dict[str, str] | None = None) -> APIError:
        self.metrics.rejections.labels(reason).inc()
        return APIError(status, message, param, code, headers)

    def check_open(self) -> None:
        if self.core.draining:
            raise self.reject("shutting_down", 503, "the server is shutting down; retry on another replica", None,
                              "shutting_down", {"Retry-After": str(self.limits.retry_after_s)})

    def check_model(self, model: str) -> None:
        if model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist. Available: {self.served_model_name}", "model",
                           "model_not_found")

    def check_max_tokens(self, value: int | None, param: str) -> int:
        max_context = self.core.info.max_context
        if value is None:
            return min(self.default_max_tokens, max_context - 1)
        if value < 1:
            raise APIError(400, f"{param} must be at least 1; got {value}", param, "invalid_value")
        if value >= max_context:
            raise APIError(400, f"{param} ({value}) must be smaller than the context window of {max_context} tokens",
                           param, "context_length_exceeded")
        return value

    def check_stop(self, stop: list[str]) -> list[str]:
        limits = self.limits
        if len(stop) > limits.max_stop_strings:
            raise APIError(400, f"stop holds at most {limits.max_stop_strings} strings; got {len(stop)}", "stop",
                           "invalid_value")
        for s in stop:
            if len(s) > limits.max_stop_chars:
                raise APIError(400, f"each stop string has at most {limits.max_stop_chars} characters; got {len(s)}",
                               "stop", "invalid_value")
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate can never match decoded text
                raise APIError(400, f"stop strings must be valid Unicode text: {error}", "stop",
                               "invalid_value") from error
        return stop

    def check_count(self, prompts: int, n: int) -> None:
        if n < 1:
            raise APIError(400, f"n must be at least 1; got {n}", "n", "invalid_value")
        if prompts * n > self.limits.max_prompts:
            raise APIError(400, f"prompts x n must be at most {self.limits.max_prompts}; got {prompts} x {n}", "n",
                           "invalid_value")

    @staticmethod
    def sampling_params(body: SamplingFields, logprobs: int | None, choice: int) -> SamplingParams:
        """Choice `choice`'s decoding settings; a value out of range is a 400 naming the parameter and its range."""
        seed = None if body.seed is None else body.seed + choice
        try:
            return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                                  top_p=1.0 if body.top_p is None else body.top_p,
                                  top_k=0 if body.top_k is None else body.top_k, seed=seed, logprobs=logprobs)
        except ValueError as error:  # SamplingParams' messages start with the parameter's name
            raise APIError(400, str(error), str(error).split()[0], "invalid_value") from error

    def _context_error(self, source: PromptSource, detail: str, max_tokens: int) -> APIError:
        max_context = self.core.info.max_context
        return self.reject("context_length", 400,
                           f"This model's maximum context length is {max_context} tokens. However, you requested "
                           f"{detail} and {max_tokens} for the completion. Please reduce the prompt or max_tokens.",
                           source.param, "context_length_exceeded")

    def precheck(self, source: PromptSource, max_tokens: int) -> None:
        """Reject what cannot fit before any tokenizer call (module docstring, step 3)."""
        info = self.core.info
        if source.token_ids is not None:
            if not source.token_ids:
                raise APIError(400, "the prompt is empty", "prompt", "empty_prompt")
            bad = [t for t in source.token_ids if not 0 <= t < info.vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {info.vocab_size}); got {bad[:3]}", "prompt",
                               "invalid_token_id")
            if len(source.token_ids) + max_tokens > info.max_context:
                raise self._context_error(source, f"{len(source.token_ids)} tokens in the prompt", max_tokens)
            return
        least = min_prompt_tokens(source.chars, info.chars_per_token)
        if least + max_tokens > info.max_context:
            raise self._context_error(source, f"a prompt of {source.chars} characters (at least {least} tokens: no "
                                              f"token covers more than {info.chars_per_token} characters)", max_tokens)

    # ------------------------------------------------------------------------------------------ generation

    async def submit(self, sources: list[PromptSource], *, max_tokens: int, stop: list[str],
                     sampling: list[SamplingParams], stream: bool) -> Submission:
        """Checks, tokenization and submission of len(sources) x len(sampling) sequences (module docstring)."""
        core = self.core
        arrival_s = core.clock.now()
        self.check_open()
        for source in sources:
            self.precheck(source, max_tokens)
        count = len(sources) * len(sampling)
        if not core.reserve(count):
            raise self.reject("queue_full", 429, f"the server is at capacity ({core.max_queued_sequences} sequences "
                              f"waiting); retry after {self.limits.retry_after_s} s", None, "queue_full",
                              {"Retry-After": str(self.limits.retry_after_s)})
        submitted = False
        try:
            info = core.info
            loop = asyncio.get_running_loop()
            encoded = await asyncio.gather(*(loop.run_in_executor(self.pool, source.encode, info.tokenizer)
                                             for source in sources), return_exceptions=True)
            token_ids: list[list[int]] = []
            for source, ids in zip(sources, encoded):
                if isinstance(ids, BaseException):
                    if not isinstance(ids, Exception):
                        raise ids  # cancellation and the like are not the request's fault
                    raise self.reject("invalid_prompt", 400, f"the {source.param} could not be tokenized: "
                                      f"{type(ids).__name__}: {ids}", source.param, "invalid_prompt")
                if not ids:
                    raise APIError(400, "the prompt is empty", source.param, "empty_prompt")
                if len(ids) + max_tokens > info.max_context:
                    raise self._context_error(source, f"{len(ids)} tokens in the prompt", max_tokens)
                token_ids.append(ids)
            events: asyncio.Queue | None = asyncio.Queue() if stream else None
            seqs: list[ServedSequence] = []
            seq_ids: list[list[int]] = []
            for p, source in enumerate(sources):
                for i, params in enumerate(sampling):
                    seqs.append(ServedSequence(core.new_id(), p * len(sampling) + i, loop, loop.create_future(),
                                               events, source, max_tokens, stop, params, arrival_s))
                    seq_ids.append(token_ids[p])
            try:
                core.submit(seqs, seq_ids, info.tokenizer_key)
            except SequenceError as error:
                raise APIError(error.status, str(error), error.param, error.code,
                               {"Retry-After": str(self.limits.retry_after_s)} if error.status == 503 else None
                               ) from error
            submitted = True
            return Submission(seqs, events)
        finally:
            if not submitted:
                core.unreserve(count)

    async def results(self, submission: Submission) -> list[GenerationOutput]:
        """The outputs of a non-streamed submission; the first failing sequence fails the request (the others are
        cancelled), a cancelled handler (client gone) cancels them all."""
        try:
            return list(await asyncio.gather(*(seq.future for seq in submission.seqs)))
        except SequenceError as error:
            self.core.cancel(submission.seqs)
            raise APIError(error.status, str(error), error.param, error.code) from error
        except BaseException:
            self.core.cancel(submission.seqs)
            raise

    async def events(self, submission: Submission) -> AsyncIterator[Event]:
        """The pieces and ends of a streamed submission in the order the worker produced them; stops after an error
        event. Leaving early (the client disconnected) cancels what is still running."""
        assert submission.events is not None
        ended = 0
        try:
            while ended < len(submission.seqs):
                event = await submission.events.get()
                yield event
                if event[1] == "end":
                    ended += 1
                elif event[1] == "error":
                    return
        finally:
            self.core.cancel(submission.seqs)


def stream_error(error: Any) -> dict[str, Any]:
    """The error chunk of a stream that already sent its 200."""
    from helios.serving.errors import error_body

    status = error.status if isinstance(error, SequenceError) else 500
    return error_body(status, str(error) or type(error).__name__, getattr(error, "param", None),
                      getattr(error, "code", None))
