"""POST /v1/codes: what the model reads for a prompt, the same rows as `tablefree codes`.

For each token: its vocabulary entry, id, bin_16(id), A c xor b and the first values of the
vector that enters the first block. Researchers use it to see the model's input.
"""

from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictInt

from model_impl import TokenCode
from model_impl.code_rows import layout, rows_for_ids

from .errors import APIError
from .openapi import ERROR_RESPONSES
from .protocol import APIModel, Text


class CodesRequest(APIModel):
    model: Text | None = None
    prompt: Text
    values: StrictInt = Field(16, ge=1, description="how many leading values of each vector to return")


class CodeRow(BaseModel):
    token: str
    id: int
    code: str = Field(description="bin_16(id), entry 0 first, in the layout's bit order")
    recoded: str = Field(description="A c xor b")
    values: list[float] = Field(description="the first values of the vector that enters the first block")


class CodeLayout(BaseModel):
    width: int
    expansion: str
    bit_order: str
    values: str
    scale: float
    matrix: list[str]
    shift: str


class CodesResponse(BaseModel):
    object: str
    layout: CodeLayout
    data: list[CodeRow]


def codes_router(tokenizer, encode: Callable[[str], Awaitable[list[int]]], config, max_tokens: int,
                 check_model: Callable[[str | None], None],
                 check_fields: Callable[[APIModel], dict[str, str] | None]) -> APIRouter:
    """`encode`: the server's tokenization of a prompt (off the event loop); `config`: the served
    checkpoint's; `max_tokens`: the longest prompt shown (the context length); `check_model` and
    `check_fields` answer for the model name and unknown fields as every route does."""
    router = APIRouter()
    code = TokenCode.from_config(config) if config.input_kind == "codes" else None

    @router.post("/v1/codes", response_model=CodesResponse, responses=ERROR_RESPONSES)
    async def codes(body: CodesRequest):
        """Each token of `prompt`: id, bin_16(id), A c xor b and the first `values` values the model reads."""
        headers = check_fields(body)
        check_model(body.model)
        if code is None:
            raise APIError(404, "this model reads a learned input table: it has no token codes", None,
                           "codes_not_supported")
        if body.values > code.width:
            raise APIError(400, f"values must be at most the model width {code.width}", "values", "invalid_value")
        ids = await encode(body.prompt)
        if len(ids) > max_tokens:
            raise APIError(400, f"prompt has {len(ids)} tokens, more than the context length {max_tokens}",
                           "prompt", "context_length_exceeded")
        rows = rows_for_ids(code, ids, tokenizer.convert_ids_to_tokens(ids), body.values)
        result = {"object": "list", "layout": layout(code), "data": [row.as_dict() for row in rows]}
        return JSONResponse(result, headers=headers)

    return router
