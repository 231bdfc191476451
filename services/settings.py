"""What a worker needs to run, handed to it by `gateway up` (or a test) as one struct."""

from pathlib import Path

import msgspec


class WorkerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Addresses, folders and limits shared by every worker of one gateway."""

    nats_url: str
    data_dir: str
    policy_dir: str
    endpoints: dict[str, str] = {}
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    max_body_bytes: int = 256 * 1024
    request_timeout_s: float = 120.0
    invoke_timeout_s: float = 60.0
    # How often a budget replica expires lost reservations and snapshots its projection.
    budget_housekeeping_s: float = 2.0  # how late past its deadline (and grace) a stuck request ends
    # Single-machine convenience: also trust the dev issuer key in the data dir. Off in an enclave,
    # where only the bundle's issuers.jwks.json (the identity service's keys) is trusted.
    trust_dev_issuer: bool = True
    # Where each identity's NKey seed lives; empty = connect without authentication.
    creds_dir: str = ""
    # The CA that signed the brokers' certificate: set, every connection starts with a TLS
    # handshake and refuses a server that cannot show that certificate (issue 11 item 4).
    nats_ca_file: str = ""
    # Pinned policy signers (key id -> base64 Ed25519 public key), from the deployment's
    # configuration, never from the bundle or the stream: an activation none of them signed is refused.
    policy_signers: dict[str, str] = {}
    # The auditor's signed checkpoints of the hash chain: after this many events, or this many
    # seconds when any arrived (issue 9 item 3).
    audit_checkpoint_events: int = 1000
    audit_checkpoint_s: float = 30.0
    # Enclave mode (issue 10 item 7): the CIDRs and host names model servers may be reached at;
    # None outside enclave mode. Every other address is refused at start and at call time.
    egress_allow: tuple[str, ...] | None = None
    # OpenTelemetry spans of model calls go to this OTLP/HTTP collector; empty: none (the default).
    otlp_traces_url: str = ""

    @property
    def keys_dir(self) -> Path:
        """Where the dev issuer keeps its key pair and the JWKS (0600)."""
        return Path(self.data_dir) / "keys"

    @property
    def audit_key_file(self) -> Path:
        """The audit-signing key (0600); `audit-signer.pub.json` beside it is its public half."""
        return self.keys_dir / "audit-signer.key"

    @property
    def audit_digest_key_file(self) -> Path:
        """The auditor's HMAC key for prompt and completion digests in Parquet (0600, never exported)."""
        return self.keys_dir / "audit-digest.key"

    @property
    def audit_dir(self) -> Path:
        """Root of the Parquet audit snapshots."""
        return Path(self.data_dir) / "audit"


def jwks_path(keys_dir: Path) -> Path:
    """The issuer public keys, by `kid`."""
    return keys_dir / "issuer.jwks.json"
