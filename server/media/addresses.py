"""Address checks: which hosts count as this machine, and which this server must never fetch from.

The private-address guard protects every fetch the server makes on a caller's behalf (remote
pre-flight, the viewer's portrait); `is_loopback` decides whether the HTTP transport binds only to
this machine. Both live here, below the transports and the viewer, so neither imports the other.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import anyio

Resolver = Callable[[str, int], Awaitable[list[str]]]


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BlockedAddressError(Exception):
    """The URL's host is (or resolves to) an address this server must not fetch from."""


def blocked_reason(address: str) -> str | None:
    """Why this IP must not be fetched (loopback, private, link-local, ...), or None if public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for label, hit in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("private", ip.is_private),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("reserved", ip.is_reserved),
    ):
        if hit:
            return f"{ip} is a {label} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def guard_url(url: str, resolve: Resolver = system_resolver) -> None:
    """Refuse a URL whose host is, or resolves to any, non-public address (every address is checked)."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise BlockedAddressError(f"{url!r} is not an http(s) URL with a host")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = await resolve(host, port)
        except OSError as exc:
            raise BlockedAddressError(f"the host {host!r} could not be resolved ({exc})") from exc
    if not addresses:
        raise BlockedAddressError(f"the host {host!r} has no address")
    for address in addresses:
        reason = blocked_reason(address)
        if reason:
            raise BlockedAddressError(f"the host {host!r} resolves to {address}: {reason}")
