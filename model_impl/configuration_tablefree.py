"""Configs of the table-free checkpoints (affine-recoded target and its plain-binary sibling).

Every layout choice the published card leaves open is a field here, so it is stored in
the checkpoint's config.json. Defaults follow the card where it speaks ("tiled") and
the author's earlier models otherwise (raw 0/1 values, MSB-first like bin_16 is
written). See README "Layout choices".

A config.json of these model types must carry the code fields: the published checkpoint
shares this project's model_type but not its field names, and reading it with default
codes would serve wrong weights silently (`from_dict` refuses it; `tablefree convert`
recovers the real layout).
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from .codes import TokenCode, bit_string, default_affine, identity_affine

INPUT_KINDS = ("codes", "table")  # table: the paper's learned-table baseline (an nn.Embedding)
NORM_TYPES = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh")  # exact GELU, tanh approximation
ROPE_STYLES = ("neox", "gptj")  # rotate-half, interleaved pairs
# The fields a config.json of a codes model must hold: the input layout is never guessed.
CODE_FIELDS = ("code_matrix", "code_shift", "code_expansion", "code_bit_order", "code_values", "code_scale")


class MissingCodeLayoutError(ValueError):
    """A config.json with this project's model_type but without its code fields."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


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
    hidden_act: str = "gelu"  # ACTIVATIONS
    layer_norm_eps: float = 1e-5
    norm_type: str = "layernorm"  # NORM_TYPES, every block's two norms and the final one
    norm_bias: bool | None = None  # LayerNorm bias; default True for layernorm (rmsnorm has none)
    # rope_theta and partial_rotary_factor (rotary on the first head_dim x factor dims of each head)
    rope_parameters: dict | None = None
    rope_style: str = "neox"  # ROPE_STYLES
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
    input_kind: str = "codes"  # INPUT_KINDS
    # Input code layout (model_impl/codes.py), for input_kind "codes".
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
        if self.norm_bias is None:
            self.norm_bias = self.norm_type == "layernorm"
        super().__post_init__(**kwargs)
        self.validate_table_free()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> TableFreeConfig:
        """Loading path of config.json (from_pretrained, AutoConfig, vLLM): refuses a missing code layout.

        Construction in code (`TableFreeConfig()`, as Transformers does internally) keeps its defaults.
        """
        given = {**config_dict, **kwargs}
        missing = [name for name in CODE_FIELDS if name not in given]
        if given.get("input_kind", "codes") == "codes" and missing:
            source = kwargs.get("name_or_path") or config_dict.get("_name_or_path") or "SRC"
            raise MissingCodeLayoutError(
                f"{source}: config.json has model_type {cls.model_type!r} but lacks this project's code fields"
                f" ({', '.join(missing)}), so its input code layout is unknown and will not be guessed."
                f" Run `tablefree inspect {source}` to see what it holds, then `tablefree convert {source} DST`"
                " to recover the layout and write a checkpoint this project serves.",
                missing,
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))

    def validate_table_free(self) -> None:
        if self.num_attention_heads <= 0 or self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"hidden_size {self.hidden_size} must equal num_attention_heads {self.num_attention_heads}"
                f" x head_dim {self.head_dim}"
            )
        for name, allowed in (
            ("input_kind", INPUT_KINDS), ("norm_type", NORM_TYPES), ("hidden_act", ACTIVATIONS), ("rope_style", ROPE_STYLES)
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.norm_type == "rmsnorm" and self.norm_bias:
            raise ValueError("norm_bias must be false for norm_type 'rmsnorm' (RMSNorm has no bias)")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"only default rotary embeddings are implemented, got rope_type {rope_type!r}")
        if not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(
                f"rope_parameters.partial_rotary_factor gives rotary dimension {self.rotary_dim}: it must be an even"
                f" number in [2, head_dim {self.head_dim}]"
            )
        if self.input_kind == "codes":
            TokenCode.from_config(self)  # raises ValueError naming the problem

    def to_diff_dict(self) -> dict:
        """A table model's config.json holds no code fields: it has no codes."""
        fields = super().to_diff_dict()
        if self.input_kind == "table":
            for name in CODE_FIELDS:
                fields.pop(name, None)
        return fields


class BinaryTableFreeConfig(TableFreeConfig):
    """The plain-binary sibling: the same model with A = I and b = 0."""

    model_type = "model_n_embed_16_binary_n_layer_32"

    def default_code(self) -> tuple[list[list[int]], list[int]]:
        return identity_affine()

    def validate_table_free(self) -> None:
        super().validate_table_free()
        if self.input_kind != "codes":
            raise ValueError(f"{self.model_type} reads codes: input_kind must be 'codes', got {self.input_kind!r}")
        code = TokenCode.from_config(self)
        if [list(row) for row in code.matrix] != identity_affine()[0] or any(code.shift):
            raise ValueError(f"{self.model_type} uses the plain binary code: code_matrix must be I and code_shift 0")
