"""Every fact is signed by the stage that decided it, and counts only with its owner's signature.

Bus permissions narrow who can write a subject, but a credential can still make the server store
bytes it did not publish itself (a JetStream API reply aimed at a `gw.evt` subject, a pull
request's deliveries, a duplicate message id). So permissions decide who may write; signatures
decide what counts. Each identity signs with its NKey seed (an Ed25519 key it already holds to
connect), and the registry names the fact subjects each identity owns: a fact is accepted only when
the pinned key of an owner of its subject signed exactly these bytes, on exactly this subject,
under exactly this message id. That also gives each stage's decisions non-repudiation (AU-10).

The signature travels in two headers, stored with the message: `Gw-Signer` (the signer's NKey
public key, `U...`) and `Gw-Sig` (base64url Ed25519 over `SIGNED_PREFIX`, subject, message id and
the event bytes, each separated by a newline; the message id carries the request id).

Message ids no other identity can compute: `Nats-Msg-Id` is the event id (`<request_id>:<stage>`)
and a tag keyed by the signer's seed. A republish of the same decision by any replica of the stage
gets the same id, and so is deduplicated, while another credential that stores junk under a
predictable id first can no longer make the genuine fact vanish as a "duplicate".

Pins: `<creds_dir>/fact-signers.json` (identity name -> public key), written with the seeds. A
deployment without identities (the benches' floors only) signs and checks nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nkeys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..schemas import codec
from . import registry

PINS_FILE = "fact-signers.json"
SIGNER = "Gw-Signer"
SIGNATURE = "Gw-Sig"
SIGNED_PREFIX = b"enclave-gateway fact v1"
_TAG_LABEL = b"enclave-gateway message id v1"


UnsignedFact = codec.UnsignedFact


class MissingPins(RuntimeError):
    """A deployment with identities but no pinned fact signers: nothing could be signed or checked."""


def signed_bytes(subject: str, msg_id: str, data: bytes) -> bytes:
    """What a fact's signature covers."""
    return b"\n".join((SIGNED_PREFIX, subject.encode(), msg_id.encode(), data))


def raw_public_key(nkey: str) -> bytes:
    """The 32 Ed25519 bytes of an NKey public key (`U...`)."""
    try:
        decoded = base64.b32decode(nkey + "=" * (-len(nkey) % 8))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not an NKey public key: {nkey[:12]!r}") from exc
    if len(decoded) != 35:
        raise ValueError(f"not an NKey public key: {nkey[:12]!r}")
    return decoded[1:33]


@dataclass(frozen=True)
class Pins:
    """Every identity's pinned public key, and the fact subjects each owns (from the registry)."""

    names: Mapping[str, str]  # public key (U...) -> identity name
    keys: Mapping[str, Ed25519PublicKey]
    apps: tuple[str, ...] = ()
    _owned: dict[tuple[str, str], bool] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, by_name: Mapping[str, str]) -> Pins:
        """Pins from identity name -> public key."""
        return cls(names={k: n for n, k in by_name.items()},
                   keys={k: Ed25519PublicKey.from_public_bytes(raw_public_key(k)) for k in by_name.values()})

    def owner(self, subject: str, headers: Mapping[str, str] | None, data: bytes) -> str:
        """The identity that signed this fact as its owner; raises UnsignedFact otherwise."""
        hdrs = headers or {}
        signer, sig, msg_id = hdrs.get(SIGNER), hdrs.get(SIGNATURE), hdrs.get("Nats-Msg-Id", "")
        if not signer or not sig:
            raise UnsignedFact(f"no signature on {subject}: a fact counts only when its owner signed it")
        name = self.names.get(signer)
        key = self.keys.get(signer)
        if name is None or key is None:
            raise UnsignedFact(f"signed on {subject} by a key no identity holds ({signer[:12]}...)")
        if not self.owns(name, subject):
            raise UnsignedFact(f"{name} signed a fact on {subject}, which it does not own")
        try:
            raw = base64.urlsafe_b64decode(sig.encode())
            if base64.urlsafe_b64encode(raw).decode() != sig:  # one encoding only: no malleable variants
                raise ValueError("non-canonical base64")
            key.verify(raw, signed_bytes(subject, msg_id, data))
        except (InvalidSignature, ValueError, binascii.Error):
            raise UnsignedFact(f"the signature of {name} on {subject} does not verify") from None
        return name

    def owns(self, name: str, subject: str) -> bool:
        """Whether identity `name` owns facts on `subject` (the registry's `signs`)."""
        hit = self._owned.get((name, subject))
        if hit is None:
            try:
                ident = registry.by_name(name)
            except KeyError:
                return False
            hit = self._owned[(name, subject)] = any(registry.matches(p, subject) for p in ident.signs)
        return hit


@dataclass(frozen=True)
class FactSigner:
    """One identity's signing key: signs the facts it publishes, and tags their message ids."""

    name: str
    public_key: str
    private: Ed25519PrivateKey
    tag_key: bytes
    pins: Pins

    @classmethod
    def from_seed(cls, name: str, seed: bytes, pins: Pins) -> FactSigner:
        """The signer of identity `name` from its NKey seed (`SU...`)."""
        _, raw = nkeys.decode_seed(bytearray(seed.strip()))
        private = Ed25519PrivateKey.from_private_bytes(bytes(raw))
        public = nkeys.from_seed(bytearray(seed.strip())).public_key.decode()
        return cls(name=name, public_key=public, private=private,
                   tag_key=hashlib.sha256(_TAG_LABEL + bytes(raw)).digest(), pins=pins)

    def msg_id(self, event_id: str) -> str:
        """`<event id>:<tag>`: the same for every replica's republish, computable by no other identity."""
        tag = hmac.new(self.tag_key, event_id.encode(), hashlib.sha256).digest()[:12]
        return f"{event_id}:{base64.urlsafe_b64encode(tag).decode()}"

    def headers(self, subject: str, msg_id: str, data: bytes) -> dict[str, str]:
        """The headers that make `data` on `subject` this identity's signed fact."""
        sig = self.private.sign(signed_bytes(subject, msg_id, data))
        return {"Nats-Msg-Id": msg_id, SIGNER: self.public_key, SIGNATURE: base64.urlsafe_b64encode(sig).decode()}


# The signature headers as an evidence package's stream columns, in this order.
HEADER_COLUMNS = (("Nats-Msg-Id", "msg_id"), (SIGNER, "signer"), (SIGNATURE, "signature"))


def as_columns(headers: Mapping[str, str] | None) -> dict[str, str | None]:
    """A stored message's signature headers as stream columns (None where it carried none)."""
    return {column: (headers or {}).get(header) for header, column in HEADER_COLUMNS}


def from_columns(values: Sequence[str | None]) -> dict[str, str]:
    """The signature headers back from the stream columns' values, in `HEADER_COLUMNS` order."""
    return {header: v for (header, _), v in zip(HEADER_COLUMNS, values, strict=True) if v is not None}


def pins_path(creds_dir: Path) -> Path:
    """Where the pinned public keys of every identity are kept (public, beside the seeds)."""
    return creds_dir / PINS_FILE


def load_pins(creds_dir: str | Path) -> Pins | None:
    """The deployment's pins, or None when it runs without identities."""
    if not creds_dir:
        return None
    try:
        by_name = msgspec.json.decode(pins_path(Path(creds_dir)).read_bytes(), type=dict[str, str])
    except FileNotFoundError:
        return None
    return Pins.of(by_name)


def load_signer(creds_dir: str | Path, name: str) -> FactSigner | None:
    """Identity `name`'s signer, when the deployment has identities and `name` may sign facts."""
    pins = load_pins(creds_dir)
    if pins is None:
        return None
    seed = Path(creds_dir) / f"{name}.nk"
    if not seed.exists():
        return None
    return FactSigner.from_seed(name, seed.read_bytes(), pins)


__all__ = ["HEADER_COLUMNS", "PINS_FILE", "FactSigner", "MissingPins", "Pins", "UnsignedFact", "as_columns",
           "from_columns", "load_pins", "load_signer", "pins_path"]
