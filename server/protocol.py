"""Request bodies of the OpenAI completions API (plus vLLM's common extras).

Unknown fields are rejected, so a typo is a 400 naming it rather than silently ignored.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

Number = StrictFloat | StrictInt
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: StrictBool = False


class CompletionRequest(Strict):
    model: StrictStr
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1)
    ]
    max_tokens: StrictInt | None = Field(16, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=-1, description="0 or -1: disabled")
    min_p: Number = Field(0.0, ge=0, le=1)
    n: StrictInt = Field(1, ge=1, le=16)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: StrictBool = False
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    repetition_penalty: Number = Field(1.0, gt=0, le=2)
    logit_bias: dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    # Accepted for SDK compatibility, supported only at their defaults.
    suffix: None = None
    best_of: Literal[1] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, stop):
        if stop is not None and any(s == "" for s in ([stop] if isinstance(stop, str) else stop)):
            raise ValueError("stop strings must not be empty")
        return stop

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TokenizeRequest(Strict):
    model: StrictStr | None = None
    prompt: StrictStr


class DetokenizeRequest(Strict):
    model: StrictStr | None = None
    tokens: list[StrictInt]
