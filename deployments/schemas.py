"""Request bodies of the HTTP API (OpenAI-compatible where OpenAI defines the field)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="send usage in a final chunk with no choices")


# OpenAI fields the service does not implement: accepted at their neutral value, refused otherwise
# (a silently ignored field is a silent wrong answer). Checked in _Generation._refuse_unsupported.
_NEUTRAL = {"logit_bias": (None, {}),
            "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "best_of": (None, 1),
            "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
            "parallel_tool_calls": (None, False), "logprobs_in_stream": (None, False)}


class _Generation(BaseModel):
    # OpenAI clients send fields beyond the ones below: known ones that change the answer are refused
    # unless neutral (_NEUTRAL); others (metadata, store, ...) do not change the answer and are ignored.
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1, description="default 64")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16, description="choices per prompt, sharing one routing decision (a seed gives "
                                               "choice i the seed + i)")
    user: str | None = Field(None, description="accepted; not used")
    response_format: dict | None = Field(None, description="only {'type': 'text'}")
    routing: RoutingOverrides | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in _NEUTRAL and value not in _NEUTRAL[name]:
                raise ValueError(f"{name}={value!r} is not supported by this server")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError(f"response_format={self.response_format!r} is not supported; only {{'type': 'text'}}")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; send one of them")
        return self

    @property
    def logprob_count(self) -> int | None:
        """None, or the alternatives to report with each token's logprob."""
        return None

    @property
    def echo_prompt(self) -> bool:
        """Whether the prompt is returned before the completion."""
        return False

    @property
    def new_tokens(self) -> int:
        """The answer budget: max_completion_tokens, else max_tokens, else 64."""
        return self.max_completion_tokens or self.max_tokens or 64


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists")
    logprobs: int | None = Field(None, ge=0, le=20, description="logprobs of each token and this many alternatives")
    echo: bool = Field(False, description="the prompt is returned before the completion (with its tokens' "
                                          "logprobs when `logprobs` is set; the first token's is null)")

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    @property
    def echo_prompt(self) -> bool:
        return self.echo

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="only text parts are supported")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] = Field(description="a string, or a list of text parts (joined by newlines)")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = Field(False, description="report each generated token's logprob")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token (needs logprobs)")

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


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
