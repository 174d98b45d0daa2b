"""The table-free model in plain PyTorch + Transformers.

Importing this package registers both model types with the Auto classes and marks the
classes for remote code, so every saved checkpoint carries `auto_map` and this code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .codes import TokenCode, TokenCoder, decode, encode
from .configuration_tablefree import BinaryTableFreeConfig, TableFreeConfig
from .modeling_tablefree import BinaryTableFreeForCausalLM, TableFreeForCausalLM

for _config, _model in ((TableFreeConfig, TableFreeForCausalLM), (BinaryTableFreeConfig, BinaryTableFreeForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "BinaryTableFreeConfig",
    "BinaryTableFreeForCausalLM",
    "TableFreeConfig",
    "TableFreeForCausalLM",
    "TokenCode",
    "TokenCoder",
    "decode",
    "encode",
]
