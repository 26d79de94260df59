"""Pre-flight of remote URLs and the private-address guard (no outbound connection is ever made).

Fetches that must connect go to small HTTP servers on loopback addresses; a policy that lets one
of them (127.0.0.2) stand for a public host shows where the pinned transport connects, without any
traffic leaving this machine.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import httpx2
import pytest
from anyio.streams.tls import TLSListener

from server.config import load_settings
from server.errors import ConfigError, PreflightError
from server.media.addresses import (
    AddressPolicy,
    BlockedAddressError,
    Resolver,
    blocked_reason,
    guard_url,
    pinned_sync_transport,
    pinned_transport,
)
from server.media.preflight import Checked, Preflight, check_audio
from server.media.sources import MediaRef
from server.sandbox.fake_dashscope import FakeDashScope
from tests import media_files
from tests.conftest import call_ok, make_env

pytestmark = pytest.mark.anyio

BLOCKED = [
    "127.0.0.1",
    "127.8.9.10",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.20",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",  # noqa: S104 (an address to refuse, not to bind)
    "224.0.0.1",
    "::1",
    "fe80::1",
    "fc00::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
]


@pytest.mark.parametrize("address", BLOCKED)
def test_the_guard_refuses_non_public_addresses(address: str) -> None:
    assert blocked_reason(address) is not None


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("2002:7f00:1::", "127.0.0.1"),  # 6to4
        ("2002:a9fe:a9fe::1", "169.254.169.254"),
        ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64, well-known prefix
        ("64:ff9b::a00:1", "10.0.0.1"),
        ("::127.0.0.1", "127.0.0.1"),  # IPv4-compatible
        ("::ffff:0:a9fe:a9fe", "169.254.169.254"),  # IPv4-translated
        ("::ffff:192.168.0.1", "192.168.0.1"),  # IPv4-mapped
    ],
)
def test_ipv6_that_embeds_a_private_ipv4_address_is_refused_as_that_address(address: str, embedded: str) -> None:
    reason = blocked_reason(address)
    assert reason is not None and embedded in reason


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"])
def test_ipv6_that_embeds_a_public_ipv4_address_is_public(address: str) -> None:
    assert blocked_reason(address) is None


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2001:4860:4860::8888"])
def test_the_guard_lets_public_addresses_through(address: str) -> None:
    assert blocked_reason(address) is None


def resolver(*addresses: str) -> Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


async def test_every_resolved_address_is_checked() -> None:
    await guard_url("https://media.example.com/a.png", resolver("93.184.216.34"))
    with pytest.raises(BlockedAddressError, match=r"10\.0\.0\.7"):
        await guard_url("https://media.example.com/a.png", resolver("93.184.216.34", "10.0.0.7"))
    with pytest.raises(BlockedAddressError, match="loopback"):
        await guard_url("http://[::1]:8080/a.png")
    with pytest.raises(BlockedAddressError, match="link-local"):
        await guard_url("http://169.254.169.254/latest/meta-data")


def served(files: dict[str, bytes | tuple[int, str]]) -> httpx2.MockTransport:
    """A transport answering from memory: what a remote host would serve, with no network."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        found = files.get(request.url.path)
        if found is None:
            return httpx2.Response(404)
        if isinstance(found, tuple):
            return httpx2.Response(found[0], headers={"location": found[1]})
        return httpx2.Response(200, content=found)

    return httpx2.MockTransport(handle)


async def test_remote_files_are_checked_when_fetched(tmp_path: Path) -> None:
    wav = media_files.wav(tmp_path / "a.wav", seconds=3).read_bytes()
    files: dict[str, bytes | tuple[int, str]] = {
        "/small.png": media_files.png_bytes((200, 600)),
        "/ok.png": media_files.png_bytes((600, 600)),
        "/a.wav": wav,
        "/moved.wav": (302, "http://10.0.0.5/a.wav"),
    }
    # Served from memory: no connection is made.
    http = served(files)
    preflight = Preflight(remote=True, resolve=resolver("93.184.216.34"), transport=http)
    checked = Checked()
    await preflight.image(MediaRef("u", url="https://media.example.com/ok.png"), "emo", "image_url", checked)
    assert checked.image is not None and (checked.image.width, checked.image.format) == (600, "PNG")
    await preflight.audio(MediaRef("u", url="https://media.example.com/a.wav"), "audio_url", checked)
    assert checked.audio is not None and checked.audio.seconds == pytest.approx(3)
    assert checked.warnings == []
    with pytest.raises(PreflightError, match="200x600"):
        await preflight.image(MediaRef("u", url="https://media.example.com/small.png"), "emo", "image_url", checked)

    # Unreachable from here: a warning, not a refusal; a redirect to a private address is re-guarded.
    for path in ("/missing.png", "/moved.wav"):
        late = Checked()
        await preflight.audio(MediaRef("u", url=f"https://media.example.com{path}"), "audio_url", late)
        assert late.audio is None
        [warning] = late.warnings
        assert "could not be fetched" in warning and "may still reach it" in warning
    assert "10.0.0.5" in warning

    # Off by default: nothing is fetched.
    quiet = Checked()
    off = Preflight(remote=False, resolve=resolver("93.184.216.34"), transport=http)
    await off.image(MediaRef("u", url="https://media.example.com/small.png"), "emo", "image_url", quiet)
    assert quiet == Checked()


async def test_remote_preflight_through_mcp_warns_for_a_loopback_url(fake: FakeDashScope, tmp_path: Path) -> None:
    from mcp import Client

    from server.app import create_app

    settings = load_settings(make_env(fake, tmp_path, EMO_MCP_PREFLIGHT="remote"), cwd=tmp_path)
    url = f"{fake.origin}/files/portrait.png"
    async with Client(create_app(settings)) as client:
        result = await call_ok(client, "emo_detect", {"image_url": url})
    assert result["check_pass"] is True
    [warning] = result["warnings"]
    assert "127.0.0.1" in warning and "loopback" in warning
    assert not any(r.path.startswith("/files/") for r in fake.requests)  # the guard stopped the fetch


def test_preflight_mode_is_validated(tmp_path: Path) -> None:
    env = {"DASHSCOPE_API_KEY": "sk-x", "OUTPUT_DIR": str(tmp_path), "EMO_MCP_PREFLIGHT": "always"}
    with pytest.raises(ConfigError, match="EMO_MCP_PREFLIGHT"):
        load_settings(env, cwd=tmp_path)


def test_an_mp3_is_read_by_content(tmp_path: Path) -> None:
    path = media_files.mp3(tmp_path / "voice.bin", seconds=12)
    info = check_audio(path, path.stat().st_size, "audio_url", str(path))
    assert info.format == "MP3" and info.seconds == pytest.approx(12, abs=0.05)


def test_server_start_up_does_not_import_pillow_or_mutagen(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from server.app import create_app; from server.config import "
        f"load_settings; create_app(load_settings({{'OUTPUT_DIR': {str(tmp_path)!r}}}, cwd=Path({str(tmp_path)!r}))); "
        "print(sorted(m for m in ('PIL', 'mutagen') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------- where a pinned fetch connects


@dataclass
class Host:
    """A tiny HTTP server on one loopback address, and the Host header of every request it got."""

    address: str
    body: bytes
    hits: list[str] = field(default_factory=list)

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        async with stream:
            head = b""
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive()
                lines = head.decode("latin-1").split("\r\n")
                self.hits.append(
                    next((ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("host:")), "")
                )
                await stream.send(
                    b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n"
                    + f"Content-Length: {len(self.body)}\r\n\r\n".encode()
                    + self.body
                )


@contextlib.asynccontextmanager
async def loopback_hosts(
    bodies: dict[str, bytes], tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[int, dict[str, Host]]]:
    """One server per loopback address, all on one port: only the address a name leads to differs."""
    hosts = {address: Host(address, body) for address, body in bodies.items()}
    first, *others = hosts
    for _ in range(20):  # another process may hold the port on one of the other addresses
        listeners = [await anyio.create_tcp_listener(local_host=first, local_port=0)]
        port = int(listeners[0].extra(anyio.abc.SocketAttribute.local_port))  # noqa: S610 (not Django)
        try:
            for address in others:
                listeners.append(await anyio.create_tcp_listener(local_host=address, local_port=port))
            break
        except OSError:
            for listener in listeners:
                await listener.aclose()
    else:  # pragma: no cover
        raise RuntimeError("no port free on every loopback address")
    try:
        async with anyio.create_task_group() as tg:
            for listener, host in zip(listeners, hosts.values(), strict=True):
                served = TLSListener(listener, tls, standard_compatible=False) if tls else listener
                tg.start_soon(served.serve, host.handle)
            yield port, hosts
            tg.cancel_scope.cancel()
    finally:
        for listener in listeners:
            await listener.aclose()


def rebinding(*answers: str) -> tuple[Resolver, list[str]]:
    """A resolver whose answers take turns (DNS rebinding), and the names it was asked for."""
    turns = itertools.cycle(answers)
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return [next(turns)]

    return resolve, asked


def stand_in(public: str) -> AddressPolicy:
    """The real policy, except that the loopback address `public` stands for a public host."""

    def policy(host: str, address: str) -> str | None:
        return None if address == public else blocked_reason(address)

    return policy


PORTRAIT_PNG = media_files.png_bytes((600, 640))


async def test_a_name_that_rebinds_to_loopback_is_never_connected_to_loopback() -> None:
    """Each fetch looks the name up once and connects to what it vetted; the old guard looked it up,
    then let the client look it up again (here: the system's answer for localhost, 127.0.0.1)."""
    resolve, asked = rebinding("127.0.0.2", "127.0.0.1")
    async with loopback_hosts({"127.0.0.2": PORTRAIT_PNG, "127.0.0.1": b"internal: secret"}) as (port, hosts):
        preflight = Preflight(remote=True, resolve=resolve, policy=stand_in("127.0.0.2"))
        results = []
        for _ in range(6):
            checked = Checked()
            await preflight.image(MediaRef("u", url=f"http://localhost:{port}/p.png"), "emo", "image_url", checked)
            results.append(checked)
    assert hosts["127.0.0.1"].hits == []
    assert hosts["127.0.0.2"].hits == [f"localhost:{port}"] * 3  # the Host header keeps the name
    fetched = [c.image for c in results if c.image is not None]
    assert [(i.width, i.height) for i in fetched] == [(600, 640)] * 3
    refused = [c.warnings for c in results if c.image is None]
    assert len(refused) == 3 and all("127.0.0.1 is a loopback address" in w[0] for w in refused)
    assert asked == ["localhost"] * 6  # one lookup per fetch, by the transport itself


async def test_the_blocking_pinned_transport_connects_only_where_it_vetted() -> None:
    """The worker-thread variant (for the video downloads): same rule, a blocking resolver."""
    turns = itertools.cycle(["127.0.0.1", "127.0.0.2"])

    def resolve(host: str, port: int) -> list[str]:
        return [next(turns)]

    async with loopback_hosts({"127.0.0.2": PORTRAIT_PNG, "127.0.0.1": b"internal: secret"}) as (port, hosts):

        def fetch_twice() -> list[str]:
            outcomes = []
            for _ in range(2):
                with httpx2.Client(transport=pinned_sync_transport(resolve, stand_in("127.0.0.2"))) as http:
                    try:
                        outcomes.append(str(len(http.get(f"http://localhost:{port}/p.png").content)))
                    except BlockedAddressError as exc:
                        outcomes.append(str(exc))
            return outcomes

        refused, fetched = await anyio.to_thread.run_sync(fetch_twice)
    assert "127.0.0.1 is a loopback address" in refused and fetched == str(len(PORTRAIT_PNG))
    assert hosts["127.0.0.1"].hits == [] and len(hosts["127.0.0.2"].hits) == 1


def self_signed(name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A certificate for `name` only (no IP address in it): the server's context and a client's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "cert.pem").write_bytes(pem)
        (Path(folder) / "key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        server.load_cert_chain(Path(folder) / "cert.pem", Path(folder) / "key.pem")
    client = ssl.create_default_context(cadata=pem.decode())
    return server, client


async def test_a_pinned_https_fetch_checks_the_certificate_of_the_name() -> None:
    """Connected to a vetted IP, the TLS handshake still names the host (SNI) and verifies its
    certificate against the name: a certificate for media.test, with no IP in it, is accepted."""
    server_tls, client_tls = self_signed("media.test")
    resolve, _ = rebinding("127.0.0.2")
    async with loopback_hosts({"127.0.0.2": PORTRAIT_PNG}, tls=server_tls) as (port, hosts):
        transport = pinned_transport(resolve, stand_in("127.0.0.2"), verify=client_tls)
        async with httpx2.AsyncClient(transport=transport) as http:
            response = await http.get(f"https://media.test:{port}/p.png")
            assert response.content == PORTRAIT_PNG
            with pytest.raises(httpx2.ConnectError, match="certificate"):
                await http.get(f"https://127.0.0.2:{port}/p.png")  # the same server, named by its IP
    assert hosts["127.0.0.2"].hits == [f"media.test:{port}"]
