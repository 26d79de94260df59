"""A loopback TCP forwarder between one worker and PostgreSQL, which a test can cut and restore.

Why: stopping the shared PostgreSQL server would take the database away from every test (and every
person) using it; a proxy takes it away from one worker only. `cut()` closes every forwarded
connection and answers new ones by closing them at once (libpq sees "server closed the connection
unexpectedly", as after a crash or a restart); `restore()` forwards again. Threads, not the test's
event loop, so the proxy keeps working while a test awaits.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit


class DatabaseProxy:
    """127.0.0.1:<port> forwarding to the database's host and port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._up = True
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopped = False
        self.refused = 0  # connections answered by a close while cut
        threading.Thread(target=self._accept, name="db-proxy", daemon=True).start()

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's (user, password, path and query kept)."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit((parts.scheme, f"{userinfo}127.0.0.1:{self.port}", parts.path, parts.query, parts.fragment))

    def cut(self) -> None:
        """The database goes away for whoever is behind the proxy: open connections drop, new ones fail."""
        with self._lock:
            self._up = False
            sockets, self._open = self._open, set()
        for sock in sockets:
            _close(sock)

    def restore(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self._stopped = True
        self.cut()
        _close(self._listener)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                self.refused += 1
                _close(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._open.update((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with self._lock:
                    self._open.discard(sock)
                _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@contextlib.contextmanager
def database_proxy(url: str) -> Iterator[DatabaseProxy]:
    """A proxy to the server `url` names (loopback only: the tests never leave this machine)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    assert host in ("127.0.0.1", "localhost", "::1"), f"the test database must be on loopback, not {host}"
    proxy = DatabaseProxy(("127.0.0.1" if host == "localhost" else host, parts.port or 5432))
    try:
        yield proxy
    finally:
        proxy.close()
