"""Enclave mode's egress guard (issue 10 item 7): no byte leaves the enclave.

The allow-list holds CIDRs and host names. An endpoint's address must name an allowed host, or be
an IP literal inside an allowed CIDR, when the invoker starts; and every name is resolved again at
call time and refused unless each address it resolves to lies inside an allowed CIDR, so a DNS
answer that moved (rebinding) reaches nothing outside. Outside enclave mode there is no guard.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from msgspec import Struct

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK = ("127.0.0.0/8", "::1/128", "localhost")  # a single machine's enclave: itself


class EgressRefused(OSError):
    """A connection the allow-list does not permit; the message says which address and why."""


class Allow(Struct, frozen=True):
    """The parsed allow-list."""

    networks: tuple[str, ...]
    hosts: tuple[str, ...]

    def nets(self) -> tuple[Network, ...]:
        """The CIDRs as networks."""
        return _networks(self.networks)


@functools.lru_cache(maxsize=64)
def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n) for n in cidrs)


def parse(entries: tuple[str, ...] | list[str]) -> Allow:
    """CIDRs and host names; raises ValueError for an entry that is neither."""
    networks, hosts = [], []
    for entry in entries:
        try:
            networks.append(str(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            name = entry.strip().lower().rstrip(".")
            if not name or any(c in name for c in "/:@ *"):
                raise ValueError(f"enclave allow-list entry {entry!r} is neither a CIDR nor a host name") from None
            hosts.append(name)
    return Allow(networks=tuple(networks), hosts=tuple(hosts))


def address_allowed(address: str, allow: Allow) -> bool:
    """Whether an IP address lies inside an allowed CIDR."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in net for net in allow.nets())


def refuse_url(url: str, allow: Allow) -> str | None:
    """Why an endpoint's address is outside the enclave, or None when it is allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) address"
    host = parts.hostname.lower().rstrip(".")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None if host in allow.hosts else f"host {host!r} is not in the enclave allow-list"
    return None if address_allowed(host, allow) else f"address {host} is outside the enclave's networks"


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing any name that resolves to an address outside the allowed CIDRs."""

    def __init__(self, allow: Allow) -> None:
        self.allow, self.inner = allow, aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        """Resolve, then check every address: one outside refuses the whole name."""
        if host.lower().rstrip(".") not in self.allow.hosts:
            raise EgressRefused(f"host {host!r} is not in the enclave allow-list")
        found = await self.inner.resolve(host, port, family)
        outside = [r["host"] for r in found if not address_allowed(r["host"], self.allow)]
        if outside:
            raise EgressRefused(f"host {host!r} resolves to {', '.join(outside)}, outside the enclave's networks")
        return found

    async def close(self) -> None:
        """Close the inner resolver."""
        await self.inner.close()


def connector(allow: Allow | None, **kwargs: Any) -> aiohttp.TCPConnector:
    """A connection pool; in enclave mode every name it connects to passes the guard."""
    return aiohttp.TCPConnector(resolver=GuardedResolver(allow), **kwargs) if allow else aiohttp.TCPConnector(
        **kwargs)
