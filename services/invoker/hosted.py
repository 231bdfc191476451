"""Credentials and request signing for the hosted APIs (Anthropic, Bedrock): shell-side I/O only.

The keys come from the invoker's environment, never from policy or the stream: Anthropic's
`ANTHROPIC_API_KEY`; Bedrock's standard AWS variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN`, and `AWS_REGION` unless the endpoint's
host names it). Bedrock requests are signed with SigV4 by botocore (the `bedrock` extra), the
maintained implementation, rather than by hand.
"""

import os
import re
from typing import Any

from msgspec import Struct

from ...schemas.events import RouteSelected
from . import adapters, decider

_REGION = re.compile(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com")


class Upstream(Struct, frozen=True, kw_only=True):
    """One call to a model server: where, what, with which headers, in which protocol."""

    protocol: str
    url: str
    body: bytes
    headers: dict[str, str]


def configured(url: str) -> tuple[str, str]:
    """An endpoint's protocol and base URL as the deployment configures it: `anthropic+https://...`
    or `bedrock+https://...` for a hosted API, a bare URL for an OpenAI-compatible server. Which
    keys go to an endpoint is the operator's word, never a route's (a route claiming a hosted
    protocol must not make the invoker send its keys to a plain model server)."""
    head, plus, rest = url.partition("+")
    return (head, rest) if plus and head in adapters.HOSTED else ("openai", url)


def secrets(env: dict[str, str] | None = None) -> list[str]:
    """The key material an invoker holds, to scrub from anything it records."""
    env = dict(os.environ) if env is None else env
    return [v for k in ("ANTHROPIC_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
            if len(v := env.get(k, "")) >= 8]


def scrub(text: str, headers: dict[str, str], env: dict[str, str] | None = None) -> str:
    """`text` without any key, signature or token that went out with the call."""
    found = [*secrets(env), *(v for k, v in headers.items() if k.lower() in _SECRET_HEADERS)]
    for secret in sorted(found, key=len, reverse=True):  # a header holding a key goes whole, before the key
        if len(secret) >= 8:
            text = text.replace(secret, "[redacted]")
    return _SIGNATURE.sub("Signature=[redacted]", text)


_SECRET_HEADERS = {"x-api-key", "authorization", "x-amz-security-token"}
_SIGNATURE = re.compile(r"Signature=[0-9a-fA-F]{8,}")


class NoCredentials(Exception):
    """The invoker's environment lacks what the endpoint's protocol needs."""


def upstream(route: RouteSelected, base_url: str, env: dict[str, str] | None = None) -> Upstream:
    """The call for a route to an endpoint at `base_url`; raises NoCredentials for a hosted API
    whose keys this invoker was not given."""
    env = dict(os.environ) if env is None else env
    path, body = decider.request_for(route)
    url = base_url.rstrip("/") + path
    headers = {"Content-Type": "application/json"}
    if route.chat.stream:
        headers["Accept"] = "application/vnd.amazon.eventstream" if route.protocol == "bedrock" else "text/event-stream"
    match route.protocol:
        case "anthropic":
            if not env.get("ANTHROPIC_API_KEY"):
                raise NoCredentials("ANTHROPIC_API_KEY is not set for this invoker")
            headers |= {"x-api-key": env["ANTHROPIC_API_KEY"], "anthropic-version": adapters.ANTHROPIC_VERSION}
        case "bedrock":
            headers = _signed(url, body, headers, env)
    return Upstream(protocol=route.protocol, url=url, body=body, headers=headers)


def _signed(url: str, body: bytes, headers: dict[str, str], env: dict[str, str]) -> dict[str, str]:
    try:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
    except ImportError as exc:  # an enclave install has no reason to carry it
        raise NoCredentials("the bedrock adapter needs botocore: pip install 'enclave-gateway[bedrock]'") from exc
    if not env.get("AWS_ACCESS_KEY_ID") or not env.get("AWS_SECRET_ACCESS_KEY"):
        raise NoCredentials("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set for this invoker")
    found = _REGION.search(url)
    region = found.group(1) if found else env.get("AWS_REGION", "us-east-1")
    request: Any = AWSRequest(method="POST", url=url, data=body, headers=headers)
    creds = Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN"))
    SigV4Auth(creds, "bedrock", region).add_auth(request)
    return {k: str(v) for k, v in request.headers.items()}


def frames(data: bytes, buffer: Any) -> list[tuple[str, str, bytes]]:
    """AWS event-stream frames in `data` (botocore's parser checks each frame's CRCs) as
    (event or exception type, message type, payload)."""
    buffer.add_data(data)
    out = []
    for message in buffer:
        h = message.headers
        out.append((str(h.get(":event-type") or h.get(":exception-type") or h.get(":error-code") or ""),
                    str(h.get(":message-type", "")), bytes(message.payload)))
    return out


def frame_buffer() -> Any:
    """botocore's event-stream buffer."""
    from botocore.eventstream import EventStreamBuffer

    return EventStreamBuffer()
