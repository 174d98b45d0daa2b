"""The server's own settings: flags of `tablefree serve`, or environment variables `TABLEFREE_<NAME>`.

The engine's options are vLLM's own flags (see engine.py); these are what vLLM's engine does
not have: HTTP, limits, shutdown, and the CPU default for the KV cache. One model, one source
of truth: the flags are generated from the fields (the settings library's own CLI mode
cannot share a parser with vLLM's, whose `--model` it would redefine).
"""

import argparse
import json
import typing

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TABLEFREE_", protected_namespaces=())

    # Not a flag (vLLM's --model and the positional MODEL are): the environment's choice of model.
    model: str | None = Field(None, description="checkpoint to serve; default: the card-shaped demo (random weights)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    api_key: SecretStr | None = Field(None, description="require 'Authorization: Bearer KEY' on the API")
    kv_cache_gb: float = Field(1.0, gt=0, description="CPU only: KV cache size in GiB when --kv-cache-memory-bytes "
                               "is not given (vLLM's CPU backend needs it explicit)")
    max_concurrent_requests: int = Field(
        256, ge=1, description="engine sequences (prompts x n) in flight; beyond it 429 with Retry-After"
    )
    max_sequences_per_request: int = Field(256, ge=1, description="prompts x n (or best_of) one request may start")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="larger bodies get 413")
    send_timeout: float = Field(60.0, gt=0, description="seconds a client may read nothing before it is dropped")
    strict_fields: bool = Field(False, description="unknown request fields are a 400 instead of ignored")
    chat_template: str | None = Field(None, description="Jinja chat template file: turns on /v1/chat/completions")
    allowed_origins: list[str] = Field(default_factory=list, description='CORS origins, e.g. \'["*"]\' (off if empty)')
    allowed_methods: list[str] = Field(["*"], description="CORS methods")
    allowed_headers: list[str] = Field(["*"], description="CORS headers")
    allow_credentials: bool = Field(False, description="CORS credentials")
    root_path: str = Field("", description="path prefix when behind a path-based proxy")
    uvicorn_log_level: typing.Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    ssl_keyfile: str | None = Field(None, description="serve HTTPS with this key ...")
    ssl_certfile: str | None = Field(None, description="... and this certificate")
    ssl_ca_certs: str | None = Field(None, description="CA certificates to verify clients with")

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("the API key must not be empty (leave --api-key out to serve without one)")
        return key


FLAGLESS = {"model"}


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; a flag not given is None, so the environment (then the default) decides."""
    group = parser.add_argument_group("server", "also from environment variables TABLEFREE_<NAME>")
    for name, field in ServerSettings.model_fields.items():
        if name in FLAGLESS:
            continue
        flag, help_ = "--" + name.replace("_", "-"), field.description
        kind = typing.get_args(field.annotation) or (field.annotation,)
        if bool in kind:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(field.annotation) is list:
            group.add_argument(flag, type=json.loads, default=None, help=f"{help_} (a JSON list)")
        elif typing.get_origin(field.annotation) is typing.Literal:
            group.add_argument(flag, choices=kind, default=None, help=help_)
        else:
            number = next((t for t in kind if t in (int, float)), str)
            group.add_argument(flag, type=number, default=None, help=help_)


def settings_from(args: argparse.Namespace) -> ServerSettings:
    """Flags win over TABLEFREE_* variables, which win over the defaults."""
    given = {name: getattr(args, name) for name in ServerSettings.model_fields
             if name not in FLAGLESS and getattr(args, name, None) is not None}
    return ServerSettings(**given)
