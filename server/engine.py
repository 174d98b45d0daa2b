"""The engine: vLLM's own options, this project's defaults where the hardware needs them, the model.

`tablefree serve` takes every option of `vllm serve`'s engine with vLLM's names and meanings
(the parser is vLLM's). Two defaults depend on the device, and are decided here only:
on CPU vLLM's runner is run eager and the KV cache gets an explicit size (its CPU backend
cannot size it from free memory); on GPUs vLLM's own defaults stand (torch.compile with CUDA
graphs, the KV cache from --gpu-memory-utilization).
"""

import argparse
import logging
import time
from pathlib import Path

from vllm.engine.arg_utils import AsyncEngineArgs

from .app import ServedModel
from .settings import ServerSettings

log = logging.getLogger("tablefree.server")
DEMO_NAME = "tablefree-demo-random-weights"
DEMO_NOTE = "demo: card-shaped, random weights, meaningless text"
UNSET = None  # what the parser leaves in an engine option the user did not give
DRAIN_S = 30


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    AsyncEngineArgs.add_cli_args(parser)
    # Options whose default depends on the device or on the environment: "not given" must be visible.
    parser.set_defaults(model=UNSET, enforce_eager=UNSET)
    # vLLM's --shutdown-timeout (0: abort at once) is how long the server drains on SIGTERM; 30 s
    # lets most requests finish, and is Kubernetes' default grace period less the engine's stop.
    parser.set_defaults(shutdown_timeout=DRAIN_S)


def device_defaults(platform, args: argparse.Namespace, settings: ServerSettings) -> dict:
    """Engine options to set because the user left them to us, on this device."""
    if not platform.is_cpu():
        return {"enforce_eager": False} if args.enforce_eager is UNSET else {}
    defaults = {}
    if args.enforce_eager is UNSET:
        defaults["enforce_eager"] = True  # bench/README.md: compiled gains <= 10% on CPU for +80-105 s per cold start
    if args.kv_cache_memory_bytes is UNSET:
        defaults["kv_cache_memory_bytes"] = int(settings.kv_cache_gb * (1 << 30))
    return defaults


def resolve_model(args: argparse.Namespace, settings: ServerSettings) -> tuple[str, list[str], str]:
    """(path, served names, note): MODEL or --model, else TABLEFREE_MODEL, else the demo, built on first use."""
    model = args.model_tag or args.model or settings.model
    if model:
        from model_impl.checkpoint import check_readable

        check_readable(model)  # vLLM would say only "Invalid repository ID or local directory"
        return model, args.served_model_name or [model], "tablefree checkpoint"
    from model_impl.checkpoint import default_checkpoint

    path = str(default_checkpoint())
    log.warning("no model given: serving the card-shaped DEMO checkpoint with RANDOM weights (%s)", path)
    return path, args.served_model_name or [DEMO_NAME], DEMO_NOTE


def engine_args(args: argparse.Namespace, settings: ServerSettings, platform=None) -> tuple[AsyncEngineArgs, ServedModel]:
    """vLLM's engine arguments as given, the device's defaults (`platform`: vLLM's current one) where not."""
    from vllm.platforms import current_platform

    path, names, note = resolve_model(args, settings)
    options = {**vars(args), "model": path, "served_model_name": names,
               **device_defaults(platform or current_platform, args, settings)}
    engine = AsyncEngineArgs.from_cli_args(argparse.Namespace(**options))
    return engine, ServedModel(names, str(Path(path)), 0, int(time.time()), note)


def build_engine(args: AsyncEngineArgs, served: ServedModel):
    """A started AsyncLLM (the plugin registers the architecture); `served` gets the engine's context length."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
    served.max_model_len = engine.model_config.max_model_len
    return engine
