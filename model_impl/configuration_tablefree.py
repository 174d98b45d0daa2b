"""Configs of the table-free checkpoints (affine-recoded target and its plain-binary sibling).

Every layout choice the published card leaves open is a field here, so it is stored in
the checkpoint's config.json. Defaults follow the card where it speaks ("tiled") and
the author's earlier models otherwise (raw 0/1 values, MSB-first like bin_16 is
written). See README "Layout choices".
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from .codes import TokenCode, bit_string, default_affine, identity_affine


class TableFreeConfig(PreTrainedConfig):
    """Decoder-only Transformer whose inputs are affine-recoded 16-bit token codes."""

    model_type = "model_binary_affine_code_n_layer_32"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 65536
    hidden_size: int = 1024
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_size: int = 4096
    max_position_embeddings: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    # Biases: the combination that gives the ~470.2M parameters of the card (see notes).
    attention_bias: bool = False  # q, k, v projections
    attention_out_bias: bool = True
    mlp_bias: bool = True
    lm_head_bias: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 57344
    bos_token_id: int | None = 57345
    eos_token_id: int | list[int] | None = 57346
    # Input code layout (model_impl/codes.py).
    # A as 16 rows of 16 "0"/"1" characters (row i, entry j), b as one such string;
    # default: codes.default_affine().
    code_matrix: list[str] | None = None
    code_shift: str | None = None
    code_expansion: str = "tile"  # "tile": block repeated; "interleave": each bit 64 times in a row
    code_bit_order: str = "msb"  # entry 0 of c(t) is the id's most ("msb") or least ("lsb") significant bit
    code_values: str = "binary"  # "binary": {0, 1}; "bipolar": {-1, +1}
    code_scale: float = 1.0

    head_dim: int | None = None

    def default_code(self) -> tuple[list[list[int]], list[int]]:
        return default_affine()

    def __post_init__(self, **kwargs) -> None:
        matrix, shift = self.default_code()
        if self.code_matrix is None:
            self.code_matrix = [bit_string(row) for row in matrix]
        if self.code_shift is None:
            self.code_shift = bit_string(shift)
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self.validate_table_free()

    def validate_table_free(self) -> None:
        if self.num_attention_heads <= 0 or self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"hidden_size {self.hidden_size} must equal num_attention_heads {self.num_attention_heads}"
                f" x head_dim {self.head_dim}"
            )
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"only default rotary embeddings are implemented, got rope_type {rope_type!r}")
        TokenCode.from_config(self)  # raises ValueError naming the problem


class BinaryTableFreeConfig(TableFreeConfig):
    """The plain-binary sibling: the same model with A = I and b = 0."""

    model_type = "model_n_embed_16_binary_n_layer_32"

    def default_code(self) -> tuple[list[list[int]], list[int]]:
        return identity_affine()

    def validate_table_free(self) -> None:
        super().validate_table_free()
        code = TokenCode.from_config(self)
        if [list(row) for row in code.matrix] != identity_affine()[0] or any(code.shift):
            raise ValueError(f"{self.model_type} uses the plain binary code: code_matrix must be I and code_shift 0")
