"""--quantization reaches the plugin's layers; a method it cannot honour is refused at start."""

import json
import shutil
import subprocess
import sys

from .live_server import free_port
from .parity import REPO, run_module


def quant_methods(checkpoint, **engine) -> dict[str, str]:
    request = {"model": str(checkpoint), "dtype": "bfloat16", "enforce_eager": True, **engine}
    return run_module("tests.vllm_layers", request, ("LAYERS",))["LAYERS"]


def test_online_fp8_reaches_every_linear_layer(tiny_checkpoint):
    """Built as vLLM builds it (weights are not loaded: vLLM's CPU build has no fp8 quantize kernel,
    `_C::static_scaled_fp8_quant`; on GPUs the same layers run fp8)."""
    plain = quant_methods(tiny_checkpoint)
    fp8 = quant_methods(tiny_checkpoint, quantization="fp8_per_tensor")
    linears = [name for name in plain if name != "lm_head"]
    projections = {name.rsplit(".", 1)[1] for name in linears}
    assert projections == {"qkv_proj", "o_proj", "up_proj", "down_proj"}
    assert {plain[name] for name in linears} == {"UnquantizedLinearMethod"}
    assert {fp8[name] for name in linears} == {"Fp8PerTensorOnlineLinearMethod"}
    # vLLM's online methods leave the output head in the model's dtype, as for its in-tree models.
    assert fp8["lm_head"] == plain["lm_head"] == "UnquantizedEmbeddingMethod"


def test_pre_quantized_method_is_refused_at_start(tiny_checkpoint, tmp_path):
    """A checkpoint that says it is GPTQ-quantized (config.json's quantization_config): the server
    stops at start naming the method, instead of loading tensors that cannot be there."""
    checkpoint = tmp_path / "gptq"
    shutil.copytree(tiny_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                     "sym": True}
    (checkpoint / "config.json").write_text(json.dumps(config))
    serve = [sys.executable, "-m", "server.cli", "serve", str(checkpoint), "--port", str(free_port())]
    proc = subprocess.run([*serve, "--dtype", "bfloat16"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "quantization 'auto_gptq' needs a pre-quantized checkpoint" in proc.stdout + proc.stderr
