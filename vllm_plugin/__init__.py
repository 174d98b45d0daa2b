"""vLLM out-of-tree plugin: serves model_impl checkpoints in vLLM's paged-attention runner.

`register` is the `vllm.general_plugins` entry point. vLLM calls it in every process it
starts, so it must be idempotent.
"""

# The `architectures` names model_impl checkpoints write; one vLLM class serves both.
ARCHITECTURES = ("TableFreeForCausalLM", "BinaryTableFreeForCausalLM")


def register() -> None:
    from vllm import ModelRegistry

    import model_impl  # noqa: F401  registers both config types with AutoConfig (exist_ok)

    supported = ModelRegistry.get_supported_archs()
    for arch in ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, "vllm_plugin.model:TableFreeForCausalLM")
