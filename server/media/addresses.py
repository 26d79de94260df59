"""Address checks: which hosts count as this machine, and which this server must never fetch from.

The private-address guard protects every fetch the server makes on a caller's behalf (remote
pre-flight, the viewer's portrait); `is_loopback` decides whether the HTTP transport binds only to
this machine. Both live here, below the transports and the viewer, so neither imports the other.

Checking a name and then letting the HTTP client look it up again is not enough: a name that
answers a public address to the check and 127.0.0.1 to the connection (DNS rebinding) gets
through. So fetches go through a pinned transport (`pinned_transport`, and the
blocking `pinned_sync_transport` for worker threads): its network backend resolves each name once,
vets every answer, and connects to a vetted address itself. The URL keeps its name, so the Host
header, TLS SNI and the certificate check are still those of the name.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import httpx2

if TYPE_CHECKING:
    import httpcore2
    from httpcore2 import AsyncNetworkBackend as _AsyncBackend
    from httpcore2 import NetworkBackend as _SyncBackend
else:  # httpcore2 (and its TLS set-up) loads with the first fetch, not at server start-up
    _AsyncBackend = _SyncBackend = object

Resolver = Callable[[str, int], Awaitable[list[str]]]
SyncResolver = Callable[[str, int], list[str]]
# (the host as the URL names it, one address it resolved to) -> why it is refused, or None.
AddressPolicy = Callable[[str, str], str | None]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 forms that carry an IPv4 address in their last 32 bits (6to4 and IPv4-mapped are decoded
# by `ipaddress` itself): NAT64's well-known prefix, SIIT's IPv4-translated, IPv4-compatible.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
# RFC 8215 local-use NAT64 embeds the IPv4 address at a prefix-dependent place: refused outright.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BlockedAddressError(Exception):
    """The URL's host is (or resolves to) an address this server must not fetch from."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64, translated, compatible)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or ip in _TRANSLATED or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _flagged(ip: Address) -> str | None:
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


def blocked_reason(address: str) -> str | None:
    """Why this IP must not be fetched (loopback, private, link-local, ...), or None if public.

    An IPv6 address that embeds an IPv4 one is judged by the IPv4 address it reaches.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return f"{ip} is a local-use NAT64 address"
        inner = embedded_ipv4(ip)
        if inner is not None:
            reason = _flagged(inner)
            return f"{ip} embeds {reason}" if reason else None
    return _flagged(ip)


def public_only(host: str, address: str) -> str | None:
    """The default policy: only public addresses, whatever the host is called."""
    return blocked_reason(address)


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def system_sync_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _vet(host: str, addresses: Iterable[str], policy: AddressPolicy) -> list[str]:
    """Every address must pass: one bad answer refuses the name (a rebinding name mixes them)."""
    vetted = list(dict.fromkeys(addresses))
    if not vetted:
        raise BlockedAddressError(f"the host {host!r} has no address")
    for address in vetted:
        reason = policy(host, address)
        if reason:
            raise BlockedAddressError(f"the host {host!r} resolves to {address}: {reason}")
    return vetted


async def vetted_addresses(
    host: str, port: int, resolve: Resolver = system_resolver, policy: AddressPolicy = public_only
) -> list[str]:
    """Resolve `host` once and vet every answer; the addresses to connect to, in order."""
    literal = _literal(host)
    if literal is not None:
        return _vet(host, [literal], policy)
    try:
        answers = await resolve(host, port)
    except OSError as exc:
        raise BlockedAddressError(f"the host {host!r} could not be resolved ({exc})") from exc
    return _vet(host, answers, policy)


def vetted_addresses_sync(
    host: str, port: int, resolve: SyncResolver = system_sync_resolver, policy: AddressPolicy = public_only
) -> list[str]:
    """`vetted_addresses` for a worker thread (a blocking resolver)."""
    literal = _literal(host)
    if literal is not None:
        return _vet(host, [literal], policy)
    try:
        answers = resolve(host, port)
    except OSError as exc:
        raise BlockedAddressError(f"the host {host!r} could not be resolved ({exc})") from exc
    return _vet(host, answers, policy)


def _split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise BlockedAddressError(f"{url!r} is not an http(s) URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise BlockedAddressError(f"{url!r} has a bad port") from exc
    return parts.hostname, port


def check_url(url: str, policy: AddressPolicy = public_only) -> None:
    """What can be refused without a lookup: not http(s), no host, or a literal address that fails.

    A name is vetted where it is resolved, by the pinned transport, on each connection.
    """
    host, _ = _split_url(url)
    literal = _literal(host)
    if literal is not None:
        _vet(host, [literal], policy)


async def guard_url(url: str, resolve: Resolver = system_resolver, policy: AddressPolicy = public_only) -> None:
    """Refuse a URL whose host is, or resolves to any, non-public address (every address is checked).

    A check only: an HTTP client that resolves the name again may reach another address. Fetch
    through `pinned_transport`, which connect to the addresses they vetted.
    """
    host, port = _split_url(url)
    await vetted_addresses(host, port, resolve, policy)


def _peer_is(stream: Any, address: str) -> bool:
    peer = stream.get_extra_info("server_addr")
    if not peer:
        return True  # a backend that cannot say; the address it was given is the vetted one
    return _literal(str(peer[0]).split("%", 1)[0]) == _literal(address.split("%", 1)[0])


class PinnedBackend(_AsyncBackend):
    """An httpcore network backend that connects only to addresses vetted from one lookup."""

    def __init__(
        self,
        resolve: Resolver = system_resolver,
        policy: AddressPolicy = public_only,
        inner: httpcore2.AsyncNetworkBackend | None = None,
    ) -> None:
        import httpcore2

        self._resolve = resolve
        self._policy = policy
        self._inner = inner or httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        import httpcore2

        addresses = await vetted_addresses(host, port, self._resolve, self._policy)
        failure: Exception | None = None
        for address in addresses:
            try:
                stream = await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
                continue
            if not _peer_is(stream, address):
                await stream.aclose()
                raise BlockedAddressError(f"the connection for {host!r} reached another address than {address}")
            return stream
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise BlockedAddressError("a pinned transport connects to vetted TCP addresses only")

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class PinnedSyncBackend(_SyncBackend):
    """`PinnedBackend` for blocking clients on worker threads (the video downloads)."""

    def __init__(
        self,
        resolve: SyncResolver = system_sync_resolver,
        policy: AddressPolicy = public_only,
        inner: httpcore2.NetworkBackend | None = None,
    ) -> None:
        import httpcore2

        self._resolve = resolve
        self._policy = policy
        self._inner = inner or httpcore2.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        import httpcore2

        addresses = vetted_addresses_sync(host, port, self._resolve, self._policy)
        failure: Exception | None = None
        for address in addresses:
            try:
                stream = self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
                continue
            if not _peer_is(stream, address):
                stream.close()
                raise BlockedAddressError(f"the connection for {host!r} reached another address than {address}")
            return stream
        assert failure is not None
        raise failure

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.NetworkStream:
        raise BlockedAddressError("a pinned transport connects to vetted TCP addresses only")


def pinned_transport(
    resolve: Resolver = system_resolver,
    policy: AddressPolicy = public_only,
    *,
    verify: ssl.SSLContext | bool = True,
) -> httpx2.AsyncHTTPTransport:
    """An httpx2 transport whose every connection goes to an address `policy` accepted.

    No proxy (a proxy would resolve the name itself) and no environment settings.
    """
    import httpcore2

    context = _ssl_context(verify)
    transport = httpx2.AsyncHTTPTransport(verify=context, trust_env=False)
    # httpx2 takes no network backend, so its pool is replaced by one built on the pinned backend.
    transport._pool = httpcore2.AsyncConnectionPool(ssl_context=context, network_backend=PinnedBackend(resolve, policy))
    return transport


def _ssl_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    """The default context is made once: loading the CA bundle costs ~20 ms, once per fetch before."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    return _default_context(verify)


@functools.cache
def _default_context(verify: bool) -> ssl.SSLContext:
    return httpx2.create_ssl_context(verify=verify, trust_env=False)


def pinned_sync_transport(
    resolve: SyncResolver = system_sync_resolver,
    policy: AddressPolicy = public_only,
    *,
    verify: ssl.SSLContext | bool = True,
) -> httpx2.HTTPTransport:
    """`pinned_transport` for a blocking `httpx2.Client` (e.g. on a worker thread)."""
    import httpcore2

    context = _ssl_context(verify)
    transport = httpx2.HTTPTransport(verify=context, trust_env=False)
    transport._pool = httpcore2.ConnectionPool(ssl_context=context, network_backend=PinnedSyncBackend(resolve, policy))
    return transport
