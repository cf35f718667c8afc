"""Request bodies of the HTTP API (OpenAI-compatible where OpenAI defines the field)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hilora_core.policies import POLICIES
from registry.validation import ADAPTER_ID_PATTERN

# Request bodies are strict: a value of the wrong JSON type (0 for a boolean, "5" for a number) is refused,
# as the OpenAPI schema says, instead of being coerced.
ADAPTER_ID = ADAPTER_ID_PATTERN.pattern
MAX_STOP = 4  # OpenAI's limit on stop sequences
DEFAULT_MAX_TOKENS = 64
SEED_MAX = 2**63 - 1 - 16  # seed + i for up to 16 choices stays a 64-bit integer
ROUTED_POLICIES = tuple(p for p in POLICIES if p != "explicit")  # explicit: name the adapter in `model`
TokenIds = Annotated[list[int], Field(min_length=1)]
Texts = Annotated[list[str], Field(min_length=1)]
if TYPE_CHECKING:  # a Literal built from the policy table: a str to the type checker, an enum to pydantic
    RoutedPolicy = str
else:
    RoutedPolicy = Literal[ROUTED_POLICIES]


class RoutingOverrides(BaseModel):
    """Per-request routing settings (a HiLoRA Serve extension of the OpenAI body)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    policy: RoutedPolicy | None = Field(None, description="the routing policy (an adapter is named in "
                                                                      "`model` instead)")
    gamma: float | None = Field(None, gt=0, le=1)
    max_candidates: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63, description="seeds the ROC sampling (None: deterministic)")
    top_k: int | None = Field(None, ge=1)
    fallback: bool | None = Field(None, description="false: route to adapters even when no adapter covers the "
                                                    "request (the paper's behaviour); default from the service config")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="send usage in a final chunk with no choices")
    continuous_usage_stats: bool = Field(False, description="vLLM extension: every chunk also carries its "
                                                            "choice's usage so far")


# OpenAI fields the service does not implement: accepted at their neutral value, refused otherwise
# (a silently ignored field is a silent wrong answer). Checked in _Generation._refuse_unsupported.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "best_of": (None, 1),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "parallel_tool_calls": (None, False), "logprobs_in_stream": (None, False),
    # vLLM's sampling extensions, sent by vLLM-oriented clients
    "min_tokens": (None, 0), "repetition_penalty": (None, 1, 1.0), "top_k": (None, -1, 0),
    "min_p": (None, 0, 0.0), "use_beam_search": (None, False),
}


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"] = Field(description="json_object and json_schema are not supported")


class _Generation(BaseModel):
    # OpenAI clients send fields beyond the ones below: known ones that change the answer are refused
    # unless neutral (_NEUTRAL); others (metadata, store, ...) do not change the answer and are ignored.
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(pattern=ADAPTER_ID, description="`hilora` (routed), `base`, or an adapter id")
    max_tokens: int | None = Field(None, ge=1, description="default 64, or the service's limit when lower")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP, description="up to 4 stop strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=SEED_MAX, description="sampling seed (choice i of n uses seed + i)")
    n: int = Field(1, ge=1, le=16, description="choices per prompt, sharing one routing decision (a seed gives "
                                               "choice i the seed + i)")
    user: str | None = Field(None, description="accepted; not used")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past the end-of-sequence "
                                                "token until the token budget (benchmark clients send it)")
    response_format: TextFormat | None = Field(None, description="only {'type': 'text'} (plain text answers)")
    routing: RoutingOverrides | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Generation:
        for name, value in (self.model_extra or {}).items():
            if name in _NEUTRAL and value not in _NEUTRAL[name]:
                raise ValueError(f"{name}={value!r} is not supported by this server")
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

    def budget(self, limit: int) -> int:
        """The answer budget: max_completion_tokens, else max_tokens, else 64 (or ``limit`` when lower)."""
        return self.max_completion_tokens or self.max_tokens or min(DEFAULT_MAX_TOKENS, limit)


class CompletionRequest(_Generation):
    prompt: str | Texts | TokenIds | Annotated[list[TokenIds], Field(min_length=1)] = Field(
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
        items: list[str | int | list[int]] = [*p]
        if items and all(isinstance(x, int) for x in items):  # one prompt as token ids
            return [[x for x in items if isinstance(x, int)]]
        return [x for x in items if not isinstance(x, int)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"] = Field(description="only text parts are supported")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
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
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input: str | Annotated[list[str], Field(min_length=1, max_length=64)] = Field(..., description="1 to 64 texts")
    routing: RoutingOverrides | None = None
    position: bool = Field(False, description="also place each input on the pool map of GET /v1/pool "
                                              "(`position`: [x, y])")


class RegisterAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(..., pattern=ADAPTER_ID, description="1-128 characters of [A-Za-z0-9._-], starting with a "
                                                          "letter or digit")
    source: str = Field(..., min_length=1, description="a Hugging Face repo id or a local adapter folder")
    revision: str | None = None
    samples: list[str] = Field(..., min_length=2, max_length=1000, description="example requests the adapter "
                                                                               "serves (2 to 1000)")
    rank: int | None = Field(None, ge=1)
    alpha: float | None = Field(None, gt=0)
    targets: list[str] | None = None
    replace: bool = False
    tags: list[Annotated[str, Field(min_length=1, max_length=40)]] = Field(
        [], max_length=8, description="labels shown with the pool (a cluster, a task family); not used to route")


MAX_BATCH_SAMPLES = 50_000  # sample texts in one batch registration (all adapters together)


class RegisterAdaptersRequest(BaseModel):
    """Many registrations in one call: their samples are embedded together and the pool catches up once."""

    model_config = ConfigDict(extra="forbid", strict=True)
    adapters: list[RegisterAdapterRequest] = Field(..., min_length=1, max_length=1000)
