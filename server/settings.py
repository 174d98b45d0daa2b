"""Server settings: CLI flags, or environment variables `TABLEFREE_<NAME>` (pydantic-settings)."""

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TABLEFREE_", protected_namespaces=())

    model: str | None = Field(None, description="checkpoint directory; default: the card-shaped demo")
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: SecretStr | None = Field(None, description="bearer key required on /v1/*, /tokenize, /detokenize")
    served_model_name: str | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    kv_cache_gb: float = Field(1.0, gt=0, description="KV cache size; vLLM's CPU backend needs it explicit")
    tensor_parallel_size: int = Field(1, ge=1)
    max_concurrent_requests: int = Field(256, ge=1, description="more in flight get 429 with Retry-After")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="larger bodies get 413")
    enforce_eager: bool = True
    seed: int = 0
