"""Recovers SRC's input map by probing what enters its first decoder block.

For ids 0 and 2^j (j = 0..15) and a few thousand random ids, the first block's input must
take two values (binary {0, s} or bipolar {-s, s}) laid out as 16 bits tiled or interleaved
to the width; then b = code(0) and column j of A = code(2^p(j)) xor b, in this project's
convention (`codes.py`). The fit is checked on all 65,536 ids. When it fails, the input is
a table only if SRC holds a tensor equal to what enters the block for every id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..codes import BIT_ORDERS, CODE_BITS, TokenCode, TokenCoder, identity_affine
from .errors import ConvertError

VOCAB = 1 << CODE_BITS
RANDOM_PROBES = 4096
CHUNK = 4096


class NotACode(Exception):
    """The probed inputs are not an affine 16-bit code; the message says why."""


class _Captured(Exception):
    """Stops SRC's forward pass at the first block: nothing after it is needed."""


def hidden_argument(args: Iterable, width: int) -> torch.Tensor:
    """The hidden states among a block's arguments: the first float tensor (batch, seq, width)."""
    for value in args:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 3 and value.shape[-1] == width:
            return value
    raise ConvertError(f"none of the first block's arguments is a (batch, seq, {width}) hidden-state tensor")


@torch.no_grad()
def first_block_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor, width: int) -> torch.Tensor:
    """What enters `block` for every id of `ids`, each as a sequence of one token: (len(ids), width)."""
    captured: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        captured.append(hidden_argument((*args, *kwargs.values()), width)[:, 0].float().clone())
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk in ids.split(CHUNK):
            try:
                model(chunk.view(-1, 1))
            except _Captured:
                continue
            raise ConvertError("SRC's forward pass never reached its first block")
    finally:
        handle.remove()
    return torch.cat(captured)


def probe_ids(seed: int = 0) -> torch.Tensor:
    random_ids = torch.randint(0, VOCAB, (RANDOM_PROBES,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([0] + [1 << j for j in range(CODE_BITS)]), random_ids])


def fit_code(inputs: torch.Tensor) -> TokenCode:
    """An affine code matching `inputs` (row t = what enters the first block for id t) on every id."""
    if inputs.shape[0] != VOCAB:
        raise NotACode(f"the vocabulary has {inputs.shape[0]} ids, a 16-bit code needs {VOCAB}")
    width = inputs.shape[1]
    if width % CODE_BITS:
        raise NotACode(f"the width {width} is not a multiple of {CODE_BITS}")
    probe = inputs[probe_ids()]
    lo, hi = probe.min().item(), probe.max().item()
    tol = 1e-5 * max(abs(lo), abs(hi), 1e-30)
    near_hi = (probe - hi).abs() <= tol
    if not ((probe - lo).abs() <= tol).logical_or(near_hi).all() or hi - lo <= tol:
        distinct = probe.unique().numel()
        raise NotACode(f"{distinct} distinct values enter the first block (a binary code has 2)")
    if abs(lo) <= tol:
        values, scale = "binary", hi
    elif abs(lo + hi) <= tol:
        values, scale = "bipolar", hi
    else:
        raise NotACode(f"the two input values {lo:g} and {hi:g} are neither {{0, s}} nor {{-s, s}}")
    copies = width // CODE_BITS
    bits = near_hi.int()
    if torch.equal(bits, bits[:, :CODE_BITS].repeat(1, copies)):
        expansion, code_bits = "tile", bits[:, :CODE_BITS]
    elif torch.equal(bits, bits[:, ::copies].repeat_interleave(copies, dim=1)):
        expansion, code_bits = "interleave", bits[:, ::copies]
    else:
        raise NotACode(f"the width-{width} input is not 16 bits tiled or interleaved")
    shift = code_bits[0].tolist()
    candidates = []
    for order in BIT_ORDERS:
        layout = TokenCode(*identity_affine(), width, expansion, order, values, scale)  # for bit_position only
        columns = [code_bits[1 + layout.bit_position(j)].tolist() for j in range(CODE_BITS)]
        matrix = [[columns[j][i] ^ shift[i] for j in range(CODE_BITS)] for i in range(CODE_BITS)]
        candidates.append((matrix, order))
    # Any bit order gives an equivalent A; prefer the one in which A is the identity (a plain binary code).
    matrix, order = next((c for c in candidates if c[0] == identity_affine()[0]), candidates[0])
    try:
        code = TokenCode(tuple(map(tuple, matrix)), tuple(shift), width, expansion, order, values, scale)
    except ValueError as err:
        raise NotACode(f"the recovered map is not invertible: {err}") from err
    check_code(code, inputs)
    return code


@torch.no_grad()
def check_code(code: TokenCode, inputs: torch.Tensor) -> None:
    """`code` must reproduce `inputs` for every id."""
    coder = TokenCoder(code)
    tol = 1e-5 * code.scale
    for ids in torch.arange(inputs.shape[0]).split(CHUNK):
        wrong = ((coder(ids, torch.float32) - inputs[ids]).abs() > tol).any(-1).nonzero()
        if len(wrong):
            raise NotACode(f"an affine fit from ids 0 and 2^j disagrees with id {ids[wrong[0]].item()}")


@dataclass
class InputMap:
    code: TokenCode | None  # an affine code...
    table: str | None  # ...or SRC's table tensor holding exactly what enters the first block
    note: str  # how it was found, for the report


def recover_input(inputs: torch.Tensor, state: dict[str, torch.Tensor], table: str | None) -> InputMap:
    """The input map of SRC, given what enters its first block for every id (row t for id t)."""
    try:
        code = fit_code(inputs)
    except NotACode as why:
        if table is not None and torch.allclose(state[table].float(), inputs, rtol=1e-5, atol=1e-6):
            return InputMap(None, table, f"a learned table ({table}), not an affine 16-bit code: {why}")
        has = f"its table {table} is not what enters the first block" if table else "SRC holds no input table"
        raise ConvertError(f"SRC's input is not an affine 16-bit code ({why}), and {has}") from why
    how = (f"affine 16-bit code ({code.expansion}, {code.bit_order}, {code.values} x {code.scale:g}),"
           f" A and b solved from ids 0 and 2^j, checked on all {inputs.shape[0]:,} ids")
    return InputMap(code, None, how)
