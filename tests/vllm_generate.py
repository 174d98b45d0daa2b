"""Greedy generation in a fresh process, for engines that need processes of their own (TP).

    python -m tests.vllm_generate '{"checkpoint": ..., "prompts": [[ids]], "engine": {...}}'
prints one line `RESULT <json>`: `parity.completions` of the outputs.
"""

import json
import sys

from tests.parity import completions, engine_settings, greedy_params

if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    from vllm import LLM

    llm = LLM(**engine_settings(request["checkpoint"], **request.get("engine", {})))
    outputs = llm.generate([{"prompt_token_ids": p} for p in request["prompts"]], greedy_params(), use_tqdm=False)
    print("RESULT " + json.dumps(completions(outputs)), flush=True)
