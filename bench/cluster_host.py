"""Processes of a local cluster, shared by bench/cluster.py and tests/test_cluster.py.

Why one module: the nginx configuration the tests and the bench run is `deploy/nginx.conf` itself,
rendered with their ports by one function (`render_nginx`), so a change to the shipped file is what
both measure. The rest starts and kills the processes of a bench run: workers (`--transport http`
on loopback ports, restartable on the same port so nginx's upstream list stays valid after a kill),
nginx, and the fake DashScope in its own process (`bench.fake_host --control`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import httpx2

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
# Each worker: the installed server over HTTP (its settings come from the environment the bench gives it).
WORKER_COMMAND = (sys.executable, "-m", "server", "--transport", "http")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def render_nginx(prefix: Path, listen: int, bases: Sequence[str]) -> Path:
    """deploy/nginx.conf with these ports (`bases`: the workers' `http://127.0.0.1:port`), and an
    access log naming the worker of each request."""
    template = (ROOT / "deploy" / "nginx.conf").read_text(encoding="utf-8")
    address = [base.removeprefix("http://") for base in bases]
    servers = "".join(f"        server {a} max_fails=1 fail_timeout=5s;\n" for a in address)
    upstream = re.compile(r"(    upstream emo_workers \{\n(?:        #.*\n)*)(?:        server .*\n)+")
    text, replaced = upstream.subn(lambda m: m.group(1) + servers, template)
    assert replaced == 1
    text, replaced = re.subn(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{listen};", text)
    assert replaced == 1
    text = text.replace("access_log off;", "log_format worker '$upstream_addr'; access_log logs/workers.log worker;")
    for folder in ("tmp", "logs"):
        (prefix / folder).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(text, encoding="utf-8")
    return conf


async def wait_up(base: str, seconds: float = 30.0, alive: Callable[[], bool] = lambda: True) -> bool:
    """Until `base`/healthz answers 200 (a worker, or nginx in front of one); False as soon as `alive()`
    says its process has gone; an error after `seconds`."""
    deadline = time.monotonic() + seconds
    async with httpx2.AsyncClient(timeout=2) as raw:
        while time.monotonic() < deadline:
            if not alive():
                return False
            with contextlib.suppress(httpx2.TransportError):
                if (await raw.get(f"{base}/healthz")).status_code == 200:
                    return True
            await anyio.sleep(0.05)
    raise RuntimeError(f"{base} did not come up within {seconds:g} s")


class WorkerProcess:
    """One worker on a fixed loopback port; `kill` is SIGKILL, `start` starts it again on that port."""

    def __init__(self, index: int, env: Mapping[str, str], cwd: Path) -> None:
        self.index = index
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = dict(env)
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        if self._log is None:
            self._log = (self.cwd / f"worker-{self.index}.log").open("ab")
        command = [*WORKER_COMMAND, "--port", str(self.port)]
        self.process = subprocess.Popen(
            command, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, and reap it (a zombie keeps its pid alive for the same-host checks)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGINT (a clean stop hands the worker's claims to the others), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, size: int = 2000) -> str:
        path = self.cwd / f"worker-{self.index}.log"
        return path.read_text(encoding="utf-8", errors="replace")[-size:] if path.exists() else ""

    async def come_up(self, seconds: float = 30.0, attempts: int = 3) -> None:
        """Start and wait for /healthz. A port found free can be taken by another socket before the worker
        binds it (an outgoing connection's local port): then the worker exits, and it is started again on
        a new port (only before nginx is rendered). Any other early exit is an error showing its log."""
        for _ in range(attempts):
            self.start()
            try:
                if await wait_up(self.base, seconds, self.alive):
                    return
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}:\n{self.log_tail()}") from None
            if "address already in use" not in self.log_tail().lower():
                raise RuntimeError(f"worker {self.index} exited at start:\n{self.log_tail()}")
            self.port = free_port()
            self.base = f"http://127.0.0.1:{self.port}"
        raise RuntimeError(f"worker {self.index} found no free port in {attempts} attempts")


class Cluster:
    """`count` workers with one environment, and nginx in front of them (round robin)."""

    def __init__(
        self,
        env: Mapping[str, str],
        work: Path,
        count: int,
        *,
        nginx: bool = True,
        upstreams: Sequence[str] | None = None,
    ) -> None:
        """`upstreams`: a DASHSCOPE_HTTP_BASE_URL per worker (the fake's `--ports`), else env's for all."""
        self.work = work
        self.workers = [
            WorkerProcess(index, {**env, **({"DASHSCOPE_HTTP_BASE_URL": upstreams[index]} if upstreams else {})}, work)
            for index in range(count)
        ]
        self.nginx_port = free_port() if nginx else 0
        self._nginx: subprocess.Popen[bytes] | None = None
        self._use_nginx = nginx

    @property
    def base(self) -> str:
        """Where clients go: nginx, or the only worker (whose port is known once it is up)."""
        return f"http://127.0.0.1:{self.nginx_port}" if self._use_nginx else self.workers[0].base

    async def start(self) -> None:
        async with anyio.create_task_group() as tg:
            for worker in self.workers:
                tg.start_soon(worker.come_up)
        if self._use_nginx:
            self._start_nginx()
            await wait_up(self.base)

    def _start_nginx(self) -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed (Debian: apt-get install nginx)")
        prefix = self.work / f"nginx-{self.nginx_port}"
        conf = render_nginx(prefix, self.nginx_port, [w.base for w in self.workers])
        command = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
        # Its errors (an upstream reset, a timeout) in the prefix, for a look at what a client saw as a 502.
        with (prefix / "logs" / "error.log").open("ab") as errors:
            self._nginx = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)

    def close(self) -> None:
        if self._nginx is not None and self._nginx.poll() is None:
            self._nginx.send_signal(signal.SIGQUIT)
            try:
                self._nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._nginx.kill()
                self._nginx.wait()
        for worker in self.workers:
            worker.close()


class FakeHost:
    """`bench.fake_host --control` in its own process: its base URL and its commands."""

    def __init__(self, api_key: str, *, polls_to_finish: int = 1, auto_progress: bool = True, ports: int = 0) -> None:
        command = [
            sys.executable,
            "-m",
            "bench.fake_host",
            "--control",
            "--api-key",
            api_key,
            "--polls-to-finish",
            str(polls_to_finish),
        ]
        if not auto_progress:
            command.append("--no-auto-progress")
        if ports:
            command += ["--ports", str(ports)]
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8"}
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin: IO[bytes] = self.process.stdin
        self._stdout: IO[bytes] = self.process.stdout
        self.base_url = self._stdout.readline().decode().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the fake did not start (exit code {self.process.poll()})")
        # One base URL per worker when `ports` is given: the fake then knows which worker asked.
        self.worker_urls: list[str] = list(self.ask("ports")["base_urls"])

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        self._stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        self._stdin.flush()
        answer: dict[str, Any] = json.loads(self._stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"the fake refused {op}: {answer['error']}")
        return answer

    def close(self) -> None:
        self._stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stdout.close()
