"""OpenAI API schemas (pydantic), per endpoint, as vLLM lays them out: the handlers live in helios/serving/api.py.

    python -c "from helios.serving.protocol import CompletionRequest; print(CompletionRequest.model_json_schema())"

Only what the engine can honour is accepted: decoding is greedy (temperature/top_p are accepted and ignored, as a
greedy server must), one choice per prompt (`n` must be 1), no logprobs. Unknown extra fields are ignored, as
OpenAI's own server does, so that clients sending newer parameters still work.
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
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # accepted; decoding is greedy regardless
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
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
    logprobs: None = None  # not supported: a value other than null is a validation error (400)

    def prompt_texts(self) -> list[str] | None:
        """The prompt as texts (None when it was given as token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, str) for p in self.prompt):
            return list(self.prompt)  # type: ignore[arg-type]
        return None


class CompletionChoice(OpenAIBase):
    index: int
    text: str
    logprobs: None = None
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
    max_completion_tokens: int | None = None  # the newer name of max_tokens; either is accepted


class ChatResponseMessage(OpenAIBase):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(OpenAIBase):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
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
    logprobs: None = None
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
