"""Greedy generation in a fresh process, for engines that need processes of their own (TP, PP, compiled).

    python -m tests.vllm_generate '{"checkpoint": ..., "prompts": [[ids]], "engine": {...}}'
prints `ENGINE <json>`: the effective settings read back from the engine (see `facts`),
and `RESULT <json>`: `parity.completions` of the outputs.
"""

import json
import os
import sys

from tests.parity import backbone_compiled, completions, engine_settings, greedy_params


def facts(llm) -> dict:
    """What the engine really runs: vLLM's platform may rewrite the settings it was given."""
    config = llm.llm_engine.vllm_config
    parallel, compilation = config.parallel_config, config.compilation_config
    return {
        "tensor_parallel_size": parallel.tensor_parallel_size,
        "pipeline_parallel_size": parallel.pipeline_parallel_size,
        "distributed_executor_backend": str(parallel.distributed_executor_backend),
        "compilation_mode": compilation.mode.name,
        "compile_backend": compilation.backend,
        "compiled": llm.apply_model(backbone_compiled),  # one entry per worker
    }


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships `backbone_compiled` to workers
    from vllm import LLM

    llm = LLM(**engine_settings(request["checkpoint"], **request.get("engine", {})))
    print("ENGINE " + json.dumps(facts(llm)), flush=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in request["prompts"]], greedy_params(), use_tqdm=False)
    print("RESULT " + json.dumps(completions(outputs)), flush=True)
