"""Server settings: CLI flags, or environment variables `TABLEFREE_<NAME>` (pydantic-settings)."""

from pydantic import Field, SecretStr, field_validator
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
    max_concurrent_requests: int = Field(
        256, ge=1, description="engine sequences (prompts x n) in flight; beyond it 429 with Retry-After"
    )
    max_sequences_per_request: int = Field(256, ge=1, description="prompts x n (or best_of) one request may start")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="larger bodies get 413")
    shutdown_timeout: float = Field(30.0, ge=0, description="on SIGTERM, seconds requests in flight may finish")
    send_timeout: float = Field(60.0, gt=0, description="seconds a client may read nothing before it is dropped")
    strict_fields: bool = Field(False, description="unknown request fields are a 400 instead of ignored")
    enforce_eager: bool = True
    seed: int = 0

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("the API key must not be empty (leave --api-key out to serve without one)")
        return key
