"""Builds the vLLM engine and the served-model description from the settings."""

import logging
import time
from pathlib import Path

from .app import ServedModel
from .settings import ServerSettings

log = logging.getLogger("tablefree.server")
DEMO_NAME = "tablefree-demo-random-weights"


def resolve_model(settings: ServerSettings) -> tuple[str, str, str]:
    """(path, served name, note); with no --model, the card-shaped demo, built on first use."""
    if settings.model:
        name = settings.served_model_name or settings.model
        return settings.model, name, "tablefree checkpoint"
    from model_impl.checkpoint import default_checkpoint

    path = str(default_checkpoint())
    log.warning("no --model given: serving the card-shaped DEMO checkpoint with RANDOM weights (%s)", path)
    return path, settings.served_model_name or DEMO_NAME, "demo: card-shaped, random weights, meaningless text"


def build_engine(settings: ServerSettings):
    """A started in-process AsyncLLM (the plugin registers the architecture) and its description."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    path, name, note = resolve_model(settings)
    args = AsyncEngineArgs(
        model=path,
        served_model_name=[name],
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        kv_cache_memory_bytes=int(settings.kv_cache_gb * (1 << 30)),
        tensor_parallel_size=settings.tensor_parallel_size,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
    )
    engine = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
    served = ServedModel([name], str(Path(path)), engine.model_config.max_model_len, int(time.time()), note)
    return engine, served
