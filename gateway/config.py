"""`gateway.toml`: data dir, listen addresses, limits, endpoints (DESIGN §0)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec


class NatsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The embedded broker's listen address."""

    host: str = "127.0.0.1"
    port: int = 4222
    # TLS for every connection to the bus, with certificates `gateway up` makes in the data dir
    # (tls/) when none exist: the workers pin that CA, so a process squatting the port gets nothing
    tls: bool = False


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


class PolicyConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The policy signers this deployment trusts: public key files from `gateway policy keygen`.

    Empty: `gateway up` makes a dev signer in the data dir and trusts only it (and says so).
    """

    trusted_signers: list[str] = []


class AuditConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How often the auditor signs a checkpoint of the hash chain: after so many events, or so many
    seconds when any arrived."""

    checkpoint_events: int = 1000
    checkpoint_seconds: float = 30.0


class EnclaveConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Enclave mode: model servers may be reached only at these CIDRs and host names (issue 10)."""

    enabled: bool = False
    allow: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128", "localhost"])


class TelemetryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenTelemetry spans of model calls, sent over OTLP/HTTP to this collector (off when empty;
    in enclave mode the address must pass `[enclave] allow`)."""

    otlp_traces_url: str = ""


class ConsoleConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`gateway console`: the read-only web console (issue 13), on loopback unless told otherwise;
    a session token with one of `roles` opens it."""

    host: str = "127.0.0.1"
    port: int = 8090
    roles: list[str] = msgspec.field(default_factory=lambda: ["analyst", "assessor", "soc"])


class GatewayConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The whole file; every key has a default so an empty file is valid."""

    data_dir: str = "var"
    policy_dir: str = "policies"
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    enclave: EnclaveConfig = msgspec.field(default_factory=EnclaveConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    console: ConsoleConfig = msgspec.field(default_factory=ConsoleConfig)
    endpoints: dict[str, str] = {}


class ConfigError(ValueError):
    """`gateway.toml` is unreadable or holds an unknown key or a wrong type; the message says where."""


def load(path: Path | None) -> GatewayConfig:
    """Read `gateway.toml` (relative paths resolve against its folder); defaults when absent.

    Every key is honoured or refused: an unknown key is a typo, and a silently ignored setting in
    a security product is a lie (issue 8).
    """
    if path is None or not path.exists():
        return GatewayConfig()
    try:
        cfg = msgspec.convert(tomllib.loads(path.read_text()), GatewayConfig)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    base = path.parent
    return msgspec.structs.replace(
        cfg,
        data_dir=str(base / cfg.data_dir),
        policy_dir=str(base / cfg.policy_dir),
        policy=PolicyConfig(trusted_signers=[str(base / p) for p in cfg.policy.trusted_signers]),
    )
