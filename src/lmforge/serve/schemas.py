"""Request bodies of the OpenAI-compatible routes, as pydantic models.

Every model forbids extra fields: a parameter this server does not implement (`tools`, `logit_bias`,
`best_of`, `suffix`, `response_format`, `dimensions`, ...) is a 400 naming it, never silently ignored.
Ranges follow OpenAI's API reference; `top_k`, `min_p` and `repetition_penalty` are the common extras
(vLLM, llama.cpp) that the generation core implements.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=16)] | None
TokenIds = list[Annotated[int, Field(ge=0)]]


class _Sampling(Strict):
    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stop: Stop = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    user: str | None = None  # recorded in the request log


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class EmbeddingRequest(Strict):
    """POST /v1/embeddings."""

    model: str
    input: str | Annotated[list[str], Field(min_length=1)] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] | None = "float"
    user: str | None = None
