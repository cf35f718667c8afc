"""Request bodies of the HTTP API (OpenAI-compatible where OpenAI defines the field)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RoutingOverrides(BaseModel):
    """Per-request routing settings (a HiLoRA Serve extension of the OpenAI body)."""

    model_config = ConfigDict(extra="forbid")
    policy: str | None = Field(None, description="hilora, hilora_gs, hilora_roc, retriever, arrow, ensemble, merged")
    gamma: float | None = Field(None, gt=0, le=1)
    max_candidates: int | None = Field(None, ge=1)
    seed: int | None = None
    top_k: int | None = Field(None, ge=1)
    fallback: bool | None = Field(None, description="false: route to adapters even when no adapter covers the "
                                                    "request (the paper's behaviour); default from the service config")


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logprobs...)
    model: str
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    routing: RoutingOverrides | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(..., min_length=1)


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[str] = Field(..., description="text(s) to route")
    routing: RoutingOverrides | None = None


class RegisterAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., min_length=1, max_length=128)
    source: str = Field(..., min_length=1, description="a Hugging Face repo id or a local adapter folder")
    revision: str | None = None
    samples: list[str] = Field(..., min_length=1)
    rank: int | None = Field(None, ge=1)
    alpha: float | None = Field(None, gt=0)
    targets: list[str] | None = None
    replace: bool = False
