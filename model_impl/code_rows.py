"""What the model reads for a text: per token, its id, bin_16(id), A c xor b and the first values.

One computation for `tablefree codes` and the server's POST /v1/codes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from .codes import CODE_BITS, TokenCode, TokenCoder, bit_string, expand, identity_affine, recode


@dataclass(frozen=True)
class CodeRow:
    token: str  # the vocabulary entry
    id: int
    code: str  # bin_16(id): c, entry 0 first, in the layout's bit order
    recoded: str  # A c xor b
    values: list[float]  # the first entries of the vector that enters the first block

    def as_dict(self) -> dict:
        return asdict(self)


def describe(code: TokenCode) -> str:
    return f"{code.expansion}, {code.bit_order} first, {code.values} x {code.scale:g}, width {code.width}"


def layout(code: TokenCode) -> dict:
    return {
        "width": code.width, "expansion": code.expansion, "bit_order": code.bit_order, "values": code.values,
        "scale": code.scale, "matrix": [bit_string(row) for row in code.matrix], "shift": bit_string(code.shift),
    }


def code_rows(tokenizer, code: TokenCode, text: str, first: int = CODE_BITS) -> list[CodeRow]:
    """Rows for the tokens of `text` (tokenized as for a prompt); `first` values of each vector, at most the width."""
    ids = tokenizer.encode(text)
    return rows_for_ids(code, ids, tokenizer.convert_ids_to_tokens(ids), first)


def rows_for_ids(code: TokenCode, ids: list[int], tokens: list[str], first: int = CODE_BITS) -> list[CodeRow]:
    """Rows for token ids already tokenized (`tokens`: their vocabulary entries)."""
    if not ids:
        return []
    tensor = torch.tensor(ids)
    matrix, shift = identity_affine()
    binary = TokenCoder(replace(code, matrix=tuple(map(tuple, matrix)), shift=tuple(shift)))  # c itself
    coder = TokenCoder(code)
    plain, recoded = recode(tensor, binary.masks, binary.shift), recode(tensor, coder.masks, coder.shift)
    values = expand(recoded, code, torch.float32)[:, : min(first, code.width)]
    return [
        CodeRow(token, i, bit_string(p), bit_string(r), v)
        for token, i, p, r, v in zip(tokens, ids, plain.tolist(), recoded.tolist(), values.tolist())
    ]
