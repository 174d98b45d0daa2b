"""Request and response bodies of the OpenAI completions API, plus vLLM's extras.

As in vLLM's server, `null` means "the default" and unknown fields are collected rather
than rejected (`extra` below); the route decides whether to ignore them with a warning
or, with `--strict-fields`, to answer 400. Every integer is bounded by what the engine
can encode, and every string must be valid Unicode (no lone surrogates), so nothing a
client sends reaches the engine as something it cannot hold.
"""

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"contains a lone surrogate at position {err.start}; send valid Unicode") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]  # ints too; not "1.5", true, NaN or Infinity
Int64 = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def _nullable_optionals(schema: dict, cls: type) -> None:
    """The schema says what the server accepts: `null` for every field that has a default."""
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        options = prop.get("anyOf", [prop])
        if name in required or any(option.get("type") == "null" for option in options):
            continue
        meta = {key: prop.pop(key) for key in ("default", "title", "description") if key in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **meta}


class APIModel(BaseModel):
    """Unknown fields land in `model_extra`; an explicit `null` means the field's default."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_nullable_optionals)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}

    @property
    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(APIModel):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = Field(False, description="usage in every chunk (vLLM)")


class SamplingRequest(APIModel):
    """What completions and chat share: the model, sampling, stopping, streaming, vLLM's extras."""

    model: Text | None = Field(None, description="the served model's name or an alias; default: the served model")
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1, le=INT32_MAX)] = Field(0, description="0 or -1: disabled")
    min_p: Annotated[Number, Field(ge=0, le=1)] = 0.0
    n: Annotated[StrictInt, Field(ge=1, le=INT32_MAX)] = 1
    stop: Annotated[Text, Field(min_length=1)] | Annotated[
        list[Annotated[Text, Field(min_length=1)]], Field(max_length=64)
    ] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Int64 | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[Number, Field(gt=0, le=2)] = 1.0
    logit_bias: dict[Text, Annotated[Number, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a decimal string) -> bias in [-100, 100]"
    )
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # vLLM's extras, with vLLM's meanings
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0, le=INT64_MAX)] = 0
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1, le=INT64_MAX)] | None = Field(
        None, description="keep only this many prompt tokens (-1: as many as fit)"
    )
    truncation_side: Literal["left", "right"] | None = Field(
        None, description="with truncate_prompt_tokens: 'left' keeps the last tokens, 'right' the first"
    )
    return_tokens_as_token_ids: StrictBool = Field(False, description="logprob tokens as 'token_id:N'")
    return_token_ids: StrictBool = Field(False, description="add token_ids and prompt_token_ids to choices")

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingRequest):
    prompt: (
        Annotated[Text, Field(min_length=1)]
        | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(description="a string, a list of strings, a list of token ids or a list of lists of token ids")
    max_tokens: Annotated[StrictInt, Field(ge=0, le=INT64_MAX)] = Field(
        16, description="tokens to generate; shortened to fit the context; 0 only with echo (score the prompt)"
    )
    best_of: Annotated[StrictInt, Field(ge=1, le=INT32_MAX)] | None = Field(
        None, description="sample best_of, return the n with the highest cumulative logprob (not with stream)"
    )
    logprobs: Annotated[StrictInt, Field(ge=0, le=INT32_MAX)] | None = Field(
        None, description="top logprobs per token, up to the engine's max_logprobs (20 by default)"
    )
    echo: StrictBool = False
    suffix: Text | None = Field(None, description="not supported: this model has no fill-in-the-middle")
    add_special_tokens: StrictBool = True
    prompt_logprobs: Annotated[StrictInt, Field(ge=-1, le=INT32_MAX)] | None = Field(
        None, description="top logprobs of each prompt token (-1: the whole vocabulary); not with stream"
    )
    use_beam_search: StrictBool = Field(False, description="beam search of width n (not with stream)")
    length_penalty: Number = 1.0


class TokenizeRequest(APIModel):
    model: Text | None = None
    prompt: Text
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(APIModel):
    model: Text | None = None
    tokens: list[TokenId]


# ---- responses (for the OpenAPI document) ----------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None
    decoded_token: str | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: int | str | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int
    note: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
