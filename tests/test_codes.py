"""The code math against an independent per-bit formula, on all 65,536 ids."""

import itertools

import numpy as np
import pytest
import torch

from model_impl.codes import CODE_BITS, TokenCode, TokenCoder, decode, default_affine, identity_affine
from model_impl.configuration_tablefree import BinaryTableFreeConfig, TableFreeConfig

WIDTH = 64
ALL_IDS = np.arange(1 << CODE_BITS, dtype=np.int64)


def make_code(expansion, bit_order, values, scale=1.0, width=WIDTH, affine=None) -> TokenCode:
    matrix, shift = affine or default_affine()
    return TokenCode(tuple(map(tuple, matrix)), tuple(shift), width, expansion, bit_order, values, scale)


def expected_codes(code: TokenCode) -> np.ndarray:
    """Written from the definitions, bit by bit: c = bin_16(t), c~ = A c + b mod 2, then expand."""
    A = np.array(code.matrix)
    b = np.array(code.shift)
    # c[t, j]: entry j of bin_16(t); msb order reads the binary numeral left to right.
    exponents = [CODE_BITS - 1 - j if code.bit_order == "msb" else j for j in range(CODE_BITS)]
    c = np.stack([(ALL_IDS // 2**e) % 2 for e in exponents], axis=1)
    recoded = (c @ A.T + b) % 2
    copies = code.width // CODE_BITS
    source = [k % CODE_BITS if code.expansion == "tile" else k // copies for k in range(code.width)]
    expanded = recoded[:, source].astype(np.float64)
    if code.values == "bipolar":
        expanded = np.where(expanded == 1, 1.0, -1.0)
    return expanded * code.scale


LAYOUTS = list(itertools.product(["tile", "interleave"], ["msb", "lsb"], ["binary", "bipolar"]))


@pytest.mark.parametrize("expansion,bit_order,values", LAYOUTS)
def test_codes_of_all_ids_match_the_per_bit_formula_and_invert(expansion, bit_order, values):
    code = make_code(expansion, bit_order, values, scale=0.5)
    ids = torch.from_numpy(ALL_IDS)
    codes = TokenCoder(code)(ids, torch.float32)
    assert codes.shape == (65536, WIDTH)
    np.testing.assert_array_equal(codes.numpy(), expected_codes(code))
    assert torch.equal(decode(codes, code), ids)


def test_plain_binary_code_is_the_numeral_of_the_id():
    code = make_code("tile", "msb", "binary", affine=identity_affine())
    codes = TokenCoder(code)(torch.tensor([0b1000_0000_0000_0101]), torch.float32)
    assert codes[0, :16].tolist() == [1] + [0] * 12 + [1, 0, 1]


def test_codes_keep_any_id_shape_and_the_requested_dtype():
    code = make_code("interleave", "lsb", "bipolar")
    ids = torch.randint(0, 65536, (3, 5, 7))
    codes = TokenCoder(code)(ids, torch.bfloat16)
    assert codes.shape == (3, 5, 7, WIDTH) and codes.dtype == torch.bfloat16
    expected = TokenCoder(code)(ids.flatten(), torch.float32).view(3, 5, 7, WIDTH)
    assert torch.equal(codes.float(), expected)


def test_the_coder_has_no_parameters_and_no_table():
    coder = TokenCoder(make_code("tile", "msb", "binary", width=1024))
    assert list(coder.parameters()) == []
    assert sum(b.numel() for b in coder.buffers()) == 2 * CODE_BITS
    assert coder.state_dict() == {}


def test_default_affine_is_deterministic_and_not_the_identity():
    assert default_affine() == default_affine()
    assert default_affine() != identity_affine()


def test_singular_matrix_is_rejected_with_its_rank():
    matrix, shift = default_affine()
    matrix[5] = matrix[3]  # two equal rows
    with pytest.raises(ValueError, match="singular over GF\\(2\\): rank 15"):
        make_code("tile", "msb", "binary", affine=(matrix, shift))
    with pytest.raises(ValueError, match="code_matrix is singular"):
        TableFreeConfig(code_matrix=["".join(map(str, row)) for row in matrix])


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"code_matrix": ["1" * 16] * 15}, "must be 16x16, got 15 rows"),
        ({"code_matrix": ["10"] * 16}, "must be 16x16"),
        ({"code_shift": "1" * 15}, "code_shift must have 16 bits, got 15"),
        ({"code_shift": "2" * 16}, "code_shift must hold only 0/1 bits"),
        ({"code_expansion": "spread"}, "code_expansion must be one of"),
        ({"code_values": "ternary"}, "code_values must be one of"),
        ({"code_scale": 0.0}, "code_scale must be positive"),
        ({"hidden_size": 72, "num_attention_heads": 2}, "72 is not a positive multiple of 16"),
    ],
)
def test_bad_layouts_raise_value_errors_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        TableFreeConfig(**fields)


def test_plain_binary_sibling_forces_the_identity():
    config = BinaryTableFreeConfig()
    code = TokenCode.from_config(config)
    assert [list(r) for r in code.matrix] == identity_affine()[0] and not any(code.shift)
    with pytest.raises(ValueError, match="plain binary code"):
        BinaryTableFreeConfig(code_shift="1" + "0" * 15)


def test_layout_round_trips_through_config_json(tmp_path):
    config = TableFreeConfig(code_expansion="interleave", code_bit_order="lsb", code_values="bipolar", code_scale=2.0)
    config.save_pretrained(tmp_path)
    loaded = TableFreeConfig.from_pretrained(tmp_path)
    assert TokenCode.from_config(loaded) == TokenCode.from_config(config)


def test_code_rows_show_each_tokens_id_bits_recoding_and_values():
    """`tablefree codes` and POST /v1/codes: the rows against the per-bit definitions above."""
    from model_impl.code_rows import code_rows
    from model_impl.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    code = make_code("interleave", "lsb", "bipolar", 0.5)
    text = "hello the test 😀"
    ids = tokenizer.encode(text)
    rows = code_rows(tokenizer, code, text, first=20)
    assert [r.id for r in rows] == ids and [r.token for r in rows] == tokenizer.convert_ids_to_tokens(ids)
    A, b = np.array(code.matrix), np.array(code.shift)
    expected = expected_codes(code)
    for row in rows:
        c = np.array([(row.id >> j) & 1 for j in range(CODE_BITS)])  # LSB first
        assert row.code == "".join(map(str, c))
        assert row.recoded == "".join(map(str, (A @ c + b) % 2))
        assert row.values == pytest.approx(expected[row.id, :20].tolist())
    assert code_rows(tokenizer, code, "") == []
