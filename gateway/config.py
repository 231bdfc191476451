"""`gateway.toml`: data dir, listen addresses, limits, endpoints (DESIGN §0)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec


class NatsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The embedded broker's listen address."""

    host: str = "127.0.0.1"
    port: int = 4222


class HttpConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The HTTP edge's listen address and body limit."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 256 * 1024
    request_timeout_s: float = 120.0


class EngineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Whether `gateway up` also serves the tiny local model, and under which endpoint name."""

    serve_tiny: bool = True
    endpoint: str = "local-llama"
    port: int = 0


class AuthConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which token issuers are trusted besides the bundle's issuers.jwks.json."""

    trust_dev_issuer: bool = True  # set false in an enclave: only the identity service's keys count


class GatewayConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The whole file; every key has a default so an empty file is valid."""

    data_dir: str = "var"
    policy_dir: str = "policies"
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    endpoints: dict[str, str] = {}


def load(path: Path | None) -> GatewayConfig:
    """Read `gateway.toml` (relative paths resolve against its folder); defaults when absent."""
    if path is None or not path.exists():
        return GatewayConfig()
    cfg = msgspec.convert(tomllib.loads(path.read_text()), GatewayConfig)
    base = path.parent
    return msgspec.structs.replace(cfg, data_dir=str(base / cfg.data_dir), policy_dir=str(base / cfg.policy_dir))
