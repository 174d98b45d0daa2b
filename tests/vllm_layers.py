"""The plugin's model as vLLM builds it (layers and their quantization methods, no weights loaded),
in a fresh process (it sets up vLLM's distributed state):

    python -m tests.vllm_layers '{"model": ..., "quantization": ...}'
prints `LAYERS <json>`: each linear layer's name and the class of its quantization method.
"""

import json
import sys

from vllm.config import set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.utils import initialize_model
from vllm.utils.network_utils import get_open_port

if __name__ == "__main__":
    config = EngineArgs(**json.loads(sys.argv[1]), kv_cache_memory_bytes=64 << 20).create_engine_config()
    with set_current_vllm_config(config):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{get_open_port()}", 0, "gloo")
        initialize_model_parallel(1, 1)
        model = initialize_model(vllm_config=config)
    layers = {
        name: type(module.quant_method).__name__
        for name, module in model.named_modules()
        if isinstance(module, LinearBase | VocabParallelEmbedding)  # ParallelLMHead included
    }
    print("LAYERS " + json.dumps(layers), flush=True)
