"""OpenAI API schemas (pydantic), per endpoint, as vLLM lays them out: the handlers live in helios/serving/api.py.

    python -c "from helios.serving.protocol import CompletionRequest; print(CompletionRequest.model_json_schema())"

Sampling: `temperature` (default 1, OpenAI's; 0 is greedy), `top_p`, `top_k` (vLLM's extra parameter), `seed`, `n`,
and logprobs (`logprobs` as an integer on /v1/completions; `logprobs` + `top_logprobs` on chat). Their ranges are
checked by helios.sampling.SamplingParams in the handler, so that a bad value gets a 400 naming the valid range.
Unknown extra fields are ignored, as OpenAI's own server does, so that clients sending newer parameters still work.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------------------ errors


class ErrorInfo(OpenAIBase):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBase):
    error: ErrorInfo


# ------------------------------------------------------------------------------------------------ shared


class UsageInfo(OpenAIBase):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(OpenAIBase):
    include_usage: bool = False


class SamplingFields(OpenAIBase):
    """Fields common to both endpoints. `max_tokens` bounds are checked in the handler against the context window."""

    model: str
    max_tokens: int | None = Field(default=None, description="new tokens; default: the server's default_max_tokens")
    # Ranges are SamplingParams' (checked in the handler, one message per parameter naming its valid values).
    temperature: float | None = Field(default=None, description="[0, 2]; default 1 (OpenAI's); 0 is greedy")
    top_p: float | None = Field(default=None, description="(0, 1]; default 1")
    top_k: int | None = Field(default=None, description="vLLM's extra parameter: >= 1, or 0 / -1 for no filter")
    n: int = Field(default=1, description="choices per prompt, >= 1; choice i is seeded with seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


# ------------------------------------------------------------------------------------------------ /v1/completions


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = Field(default=None, description="0..20 alternatives per token (the chosen one always)")

    def prompt_texts(self) -> list[str] | None:
        """The prompt as texts (None when it was given as token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, str) for p in self.prompt):
            return list(self.prompt)  # type: ignore[arg-type]
        return None


class CompletionLogProbs(OpenAIBase):
    """The legacy completions shape: parallel lists per token; `top_logprobs` maps token text to logprob (the chosen
    token and its alternatives)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIBase):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(OpenAIBase):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None  # the arm that served the request


# ------------------------------------------------------------------------------------------------ /v1/chat/completions


class ChatMessage(OpenAIBase):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts can reach a text-only model
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = Field(default=None)
    top_logprobs: int | None = Field(default=None, description="0..20; needs logprobs=true")
    max_completion_tokens: int | None = None  # the newer name of max_tokens; either is accepted


class ChatResponseMessage(OpenAIBase):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatLogProb(OpenAIBase):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBase):
    content: list[ChatLogProbsContent] | None = None


class ChatCompletionChoice(OpenAIBase):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(OpenAIBase):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class DeltaMessage(OpenAIBase):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(OpenAIBase):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionStreamResponse(OpenAIBase):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionStreamResponse(OpenAIBase):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ------------------------------------------------------------------------------------------------ /v1/models


class ModelCard(OpenAIBase):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "helios"


class ModelList(OpenAIBase):
    object: Literal["list"] = "list"
    data: list[ModelCard]
