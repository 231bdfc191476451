"""Session-token verification: EdDSA (Ed25519) JWTs via PyJWT, with the clock passed in.

PyJWT checks time claims against the wall clock, which would make replay disagree with the past;
so it verifies the signature and claim presence, and `exp`/`nbf`/`iat` are checked here against
the `now` the caller supplies (the event's `occurred_at` on replay).
"""

import hashlib
import json
from collections import OrderedDict
from datetime import datetime

import jwt
from msgspec import Struct

from ...schemas.labels import Label, LabelError, make_label

ISSUER = "enclave-gateway"
AUDIENCE = "enclave-gateway"
LEEWAY_S = 30
REQUIRED = ("exp", "iat", "iss", "aud", "sub", "jti", "team", "clearance")
KeyRing = dict[str, jwt.PyJWK]


class Claims(Struct, frozen=True, kw_only=True):
    """The verified attributes a session carries."""

    subject: str
    team: str
    roles: tuple[str, ...]
    token_id: str
    expires_at: int
    clearance: Label


class TokenDefect(Struct, frozen=True, kw_only=True):
    """Why a token was refused: a reason code of schemas.reasons and a human detail."""

    code: str
    detail: str


class _Timeless(Struct, frozen=True):
    """What a verified token's claims say regardless of the clock, in the order the checks run:
    a defect of the time claims themselves, the time bounds, then the attributes (or their defect)."""

    time_defect: TokenDefect | None
    exp: int
    nbf: int
    attributes: Claims | TokenDefect
    iat: int = 0


class TokenCache:
    """Tokens whose signature and required claims already verified against one key ring.

    Safe because what is cached is a fact about the exact token bytes and that key ring only:
    entries go in only after a successful verify (an unauthenticated caller cannot fill it), the
    time claims are checked again on every hit against the decision's `now`, the size is bounded
    (least recently used out), and each policy activation builds a new ring with an empty cache,
    so a rotated or revoked key is never trusted from memory.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Timeless] = OrderedDict()

    def get(self, digest: str) -> _Timeless | None:
        """The verified, clock-free reading of a token, by sha256 of the token."""
        checked = self._entries.get(digest)
        if checked is not None:
            self._entries.move_to_end(digest)
        return checked

    def put(self, digest: str, checked: _Timeless) -> None:
        """Remember a token that verified."""
        self._entries[digest] = checked
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def verify(token: str, keys: KeyRing, now: datetime, cache: TokenCache | None = None,
           max_lifetime_s: int | None = None) -> Claims | TokenDefect:
    """Verify a bearer token at time `now`; every defect has its own code. `max_lifetime_s` (the
    policy's bound on `exp - iat`, none in policies recorded before it) refuses a token for life."""
    if not token:
        return TokenDefect(code="token_missing", detail="no bearer token")
    digest = hashlib.sha256(token.encode()).hexdigest()
    checked = cache.get(digest) if cache is not None else None
    if checked is None:
        verified = _verify_signature(token, keys)
        if isinstance(verified, TokenDefect):
            return verified
        checked = _timeless(verified)
        if cache is not None:
            cache.put(digest, checked)
    if max_lifetime_s is not None and checked.time_defect is None and checked.exp - checked.iat > max_lifetime_s:
        return TokenDefect(code="token_malformed", detail=f"a lifetime over {max_lifetime_s} s (exp - iat), "
                                                          "which the policy does not allow")
    return _at(checked, int(now.timestamp()))


def _verify_signature(token: str, keys: KeyRing) -> dict[str, object] | TokenDefect:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        return TokenDefect(code="token_malformed", detail=str(exc))
    if header.get("alg") != "EdDSA":
        return TokenDefect(code="token_bad_algorithm", detail=f"alg {header.get('alg')!r} is not EdDSA")
    kid = header.get("kid")
    key = keys.get(str(kid))
    if key is None:
        return TokenDefect(code="token_unknown_key", detail=f"unknown kid {kid!r}")
    try:
        claims = jwt.decode(
            token,
            key=key,
            algorithms=["EdDSA"],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "require": list(REQUIRED)},
        )
    except jwt.MissingRequiredClaimError as exc:
        return TokenDefect(code="token_missing_claim", detail=str(exc))
    except jwt.InvalidSignatureError as exc:
        return TokenDefect(code="token_bad_signature", detail=str(exc))
    except jwt.InvalidAlgorithmError as exc:
        return TokenDefect(code="token_bad_algorithm", detail=str(exc))
    except jwt.PyJWTError as exc:
        return TokenDefect(code="token_malformed", detail=str(exc))
    return claims


def _timeless(claims: dict[str, object]) -> _Timeless:
    exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf", claims.get("iat"))
    if not (isinstance(exp, int) and isinstance(iat, int) and isinstance(nbf, int)):
        malformed = TokenDefect(code="token_malformed", detail="exp, iat and nbf must be integers")
        return _Timeless(malformed, 0, 0, malformed)

    return _Timeless(None, exp, nbf, _attributes(claims, exp), iat)


def _at(checked: _Timeless, now: int) -> Claims | TokenDefect:
    """The clock's part of the checks, on every decision (a cached token expires like any other)."""
    if checked.time_defect is not None:
        return checked.time_defect
    if now > checked.exp + LEEWAY_S:
        return TokenDefect(code="token_expired", detail=f"expired at {checked.exp}")
    if now + LEEWAY_S < checked.nbf:
        return TokenDefect(code="token_not_yet_valid", detail=f"valid from {checked.nbf}")
    return checked.attributes


def _attributes(claims: dict[str, object], exp: int) -> Claims | TokenDefect:
    team, sub, jti, roles = claims.get("team"), claims.get("sub"), claims.get("jti"), claims.get("roles", [])
    if not (isinstance(team, str) and team and isinstance(sub, str) and isinstance(jti, str)):
        return TokenDefect(code="token_missing_claim", detail="sub, team and jti must be non-empty strings")
    if not (isinstance(roles, list) and all(isinstance(r, str) for r in roles)):
        return TokenDefect(code="token_malformed", detail="roles must be a list of strings")
    label = _clearance(claims)
    if isinstance(label, TokenDefect):
        return label
    return Claims(subject=sub, team=team, roles=tuple(roles), token_id=jti, expires_at=exp, clearance=label)


def _clearance(claims: dict[str, object]) -> Label | TokenDefect:
    level, comps, caveats = claims.get("clearance"), claims.get("compartments", []), claims.get("caveats", [])
    if not isinstance(level, str):
        return TokenDefect(code="token_malformed", detail="clearance must be a string")
    for name, value in (("compartments", comps), ("caveats", caveats)):
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return TokenDefect(code="token_malformed", detail=f"{name} must be a list of strings")
    assert isinstance(comps, list) and isinstance(caveats, list)
    try:
        return make_label(level, tuple(comps), tuple(caveats))
    except LabelError as exc:
        return TokenDefect(code="token_malformed", detail=f"clearance: {exc}")


def keyring(jwks_texts: list[str]) -> KeyRing:
    """Public keys by `kid` from JWKS documents (the bundle's issuers, optionally the dev issuer).

    Raises ValueError for a JWKS that is not valid or a key without a `kid`.
    """
    ring: KeyRing = {}
    for text in jwks_texts:
        doc = json.loads(text)
        for jwk in doc.get("keys", []):
            if not jwk.get("kid"):
                raise ValueError("every issuer key needs a kid, so keys can rotate")
            ring[str(jwk["kid"])] = jwt.PyJWK.from_dict(jwk)
    return ring


def max_lifetime(jwks_text: str) -> int | None:
    """The policy's bound on a token's lifetime: `max_token_lifetime_s` beside the issuers' keys."""
    value = json.loads(jwks_text).get("max_token_lifetime_s")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("max_token_lifetime_s must be a whole number of seconds, at least 1")
    return value
