"""Token codes: id -> fixed binary code -> affine recoding over GF(2) -> model width.

The one definition of the code math in the project. Everything is bit operations on
the ids' own device: no table of any size. For a token id ``t``::

    c(t)  = bin_16(t)           the id's bits, as a vector in the configured bit order
    c~(t) = A c(t) xor b        A invertible over GF(2), b a fixed shift
    x(t)  = expand(values(c~))  to the model width

``A`` is kept as row masks over the id's bits, so row ``i`` of ``A c`` is the parity of
``t & mask_i``: sixteen ands and a parity fold, no lookup.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

CODE_BITS = 16
EXPANSIONS = ("tile", "interleave")
BIT_ORDERS = ("msb", "lsb")
VALUE_MAPS = ("binary", "bipolar")
# Default recoding: rows of A drawn from random.Random(DEFAULT_CODE_SEED).getrandbits(16)
# (row i's mask, bit j = entry j of that row) until A has full rank, then b from the
# next getrandbits(16). The seed is the paper's arXiv number.
DEFAULT_CODE_SEED = 260509751

Expansion = Literal["tile", "interleave"]
BitOrder = Literal["msb", "lsb"]
ValueMap = Literal["binary", "bipolar"]


def gf2_rank(rows: Sequence[int]) -> int:
    """Rank over GF(2) of a matrix given as integer row masks."""
    pivots: dict[int, int] = {}  # leading bit -> reduced row
    for row in rows:
        while row:
            lead = row.bit_length() - 1
            if lead not in pivots:
                pivots[lead] = row
                break
            row ^= pivots[lead]
    return len(pivots)


def gf2_inverse(matrix: Sequence[Sequence[int]]) -> list[list[int]]:
    """Inverse over GF(2) of an invertible square 0/1 matrix (Gauss-Jordan)."""
    n = len(matrix)
    work = [list(row) + [int(i == j) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if work[r][col])
        work[col], work[pivot] = work[pivot], work[col]
        for r in range(n):
            if r != col and work[r][col]:
                work[r] = [a ^ b for a, b in zip(work[r], work[col])]
    return [row[n:] for row in work]


def default_affine(seed: int = DEFAULT_CODE_SEED) -> tuple[list[list[int]], list[int]]:
    """The documented default (A, b): deterministic for a given seed."""
    rng = random.Random(seed)
    while True:
        masks = [rng.getrandbits(CODE_BITS) for _ in range(CODE_BITS)]
        if gf2_rank(masks) == CODE_BITS:
            break
    matrix = [[(m >> j) & 1 for j in range(CODE_BITS)] for m in masks]
    shift = rng.getrandbits(CODE_BITS)
    return matrix, [(shift >> j) & 1 for j in range(CODE_BITS)]


def identity_affine() -> tuple[list[list[int]], list[int]]:
    """A = I, b = 0: the plain binary code."""
    return [[int(i == j) for j in range(CODE_BITS)] for i in range(CODE_BITS)], [0] * CODE_BITS


def bit_string(bits: Sequence[int]) -> str:
    """[1, 0, 1] -> "101": how config.json stores rows of A and b."""
    return "".join(str(int(b)) for b in bits)


def parse_bits(value: str | Sequence[int], name: str) -> tuple[int, ...]:
    """ "101" or [1, 0, 1] -> (1, 0, 1); anything else is a ValueError naming `name`."""
    bits = tuple(int(ch) if ch in "01" else -1 for ch in value) if isinstance(value, str) else tuple(value)
    if any(b not in (0, 1) for b in bits):
        raise ValueError(f"{name} must hold only 0/1 bits, got {value!r}")
    return bits


@dataclass(frozen=True)
class TokenCode:
    """A validated code layout. Raises ValueError on anything that is not a bijection."""

    matrix: tuple[tuple[int, ...], ...]
    shift: tuple[int, ...]
    width: int
    expansion: Expansion = "tile"
    bit_order: BitOrder = "msb"
    values: ValueMap = "binary"
    scale: float = 1.0

    def __post_init__(self) -> None:
        n = CODE_BITS
        for name, value, allowed in (
            ("code_expansion", self.expansion, EXPANSIONS),
            ("code_bit_order", self.bit_order, BIT_ORDERS),
            ("code_values", self.values, VALUE_MAPS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if len(self.matrix) != n or any(len(row) != n for row in self.matrix):
            lengths = sorted({len(row) for row in self.matrix})
            raise ValueError(f"code_matrix must be {n}x{n}, got {len(self.matrix)} rows of lengths {lengths}")
        if len(self.shift) != n:
            raise ValueError(f"code_shift must have {n} bits, got {len(self.shift)}")
        rank = gf2_rank(self.row_masks(self.matrix))
        if rank != n:
            raise ValueError(f"code_matrix is singular over GF(2): rank {rank}, need {n}")
        if self.width <= 0 or self.width % n:
            raise ValueError(f"model width {self.width} is not a positive multiple of {n} code bits")
        if not self.scale > 0:
            raise ValueError(f"code_scale must be positive, got {self.scale}")

    @classmethod
    def from_config(cls, config) -> TokenCode:
        return cls(
            matrix=tuple(parse_bits(row, f"code_matrix[{i}]") for i, row in enumerate(config.code_matrix)),
            shift=parse_bits(config.code_shift, "code_shift"),
            width=config.hidden_size,
            expansion=config.code_expansion,
            bit_order=config.code_bit_order,
            values=config.code_values,
            scale=float(config.code_scale),
        )

    def bit_position(self, j: int) -> int:
        """Which bit of the id is entry j of the code vector."""
        return CODE_BITS - 1 - j if self.bit_order == "msb" else j

    def row_masks(self, matrix: Sequence[Sequence[int]]) -> list[int]:
        """Rows of a matrix as masks over the id's bits: (M c)_i = parity(t & mask_i)."""
        return [sum(v << self.bit_position(j) for j, v in enumerate(row)) for row in matrix]

    def inverse_row_masks(self) -> list[int]:
        return self.row_masks(gf2_inverse(self.matrix))


def _parity16(x: torch.Tensor) -> torch.Tensor:
    for s in (8, 4, 2, 1):
        x = x ^ (x >> s)
    return x & 1


def recode(ids: torch.Tensor, masks: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Token ids (any shape) -> A c xor b as int32 bits of shape (*ids.shape, 16).

    `masks` (int32[16]) and `shift` (int32[16]) are `code.row_masks(code.matrix)` and
    `code.shift` as tensors on the ids' device; TokenCoder holds them as buffers.
    """
    return _parity16(ids.int().unsqueeze(-1) & masks) ^ shift  # 16-bit ids fit int32


def expand(bits: torch.Tensor, code: TokenCode, dtype: torch.dtype) -> torch.Tensor:
    """Code bits (..., 16) -> values of shape (..., width) in `dtype`."""
    values = bits.to(dtype)
    if code.values == "bipolar":
        values = values * 2 - 1
    if code.scale != 1.0:
        values = values * code.scale
    # One strided copy into the output (expand + reshape is faster than repeat for 16-bit dtypes).
    copies = code.width // CODE_BITS
    lead = values.shape[:-1]
    if code.expansion == "tile":  # x[k] = c~[k % 16]
        return values.unsqueeze(-2).expand(*lead, copies, CODE_BITS).reshape(*lead, code.width)
    # interleave: x[k] = c~[k // copies]
    return values.unsqueeze(-1).expand(*lead, CODE_BITS, copies).reshape(*lead, code.width)


def encode(
    ids: torch.Tensor, masks: torch.Tensor, shift: torch.Tensor, code: TokenCode, dtype: torch.dtype
) -> torch.Tensor:
    """Token ids (any shape) -> codes of shape (*ids.shape, width) in `dtype`."""
    return expand(recode(ids, masks, shift), code, dtype)


def decode(codes: torch.Tensor, code: TokenCode) -> torch.Tensor:
    """Inverse of `encode`: codes (..., width) -> int64 token ids (...)."""
    copies = code.width // CODE_BITS
    first = codes[..., :CODE_BITS] if code.expansion == "tile" else codes[..., ::copies]
    threshold = 0.0 if code.values == "bipolar" else code.scale / 2
    bits = (first > threshold).long() ^ torch.tensor(code.shift, device=codes.device)
    positions = torch.tensor([code.bit_position(j) for j in range(CODE_BITS)], device=codes.device)
    packed = (bits << positions).sum(-1, keepdim=True)  # A c as an id-shaped integer
    inverse = torch.tensor(code.inverse_row_masks(), device=codes.device)
    return (_parity16(packed & inverse) << positions).sum(-1)


class TokenCoder(nn.Module):
    """Computes codes from ids on the ids' device. Holds 32 integers, no table.

    The masks are non-persistent buffers: they move with the module and are never
    part of a checkpoint (the layout lives in config.json).
    """

    def __init__(self, code: TokenCode) -> None:
        super().__init__()
        self.code = code
        self.register_buffer("masks", self.mask_tensor(), persistent=False)
        self.register_buffer("shift", self.shift_tensor(), persistent=False)

    def mask_tensor(self) -> torch.Tensor:
        return torch.tensor(self.code.row_masks(self.code.matrix), dtype=torch.int32)

    def shift_tensor(self) -> torch.Tensor:
        return torch.tensor(self.code.shift, dtype=torch.int32)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return encode(ids, self.masks, self.shift, self.code, dtype)

    def extra_repr(self) -> str:
        c = self.code
        return f"width={c.width}, expansion={c.expansion}, bit_order={c.bit_order}, values={c.values}, scale={c.scale}"
