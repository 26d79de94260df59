"""Tenants (issue 15): what the walls refuse, what a token check costs per call, and whether a busy
tenant on a shared key delays a quiet one.

Everything in one process: the loopback fake of DashScope (several accounts, each seeing only its own
tasks) and the real HTTP app under uvicorn, called through the SDK's client.

1. Cross-tenant attempts: every way in the list below that tenant B could reach tenant A's things,
   each counted as refused (or invisible) or not.
2. Token checks: `task_status` of a finished task (answered from the ledger, no upstream call), timed in
   interleaved rounds against the same server without auth, with the shared bearer token, with a static
   tenant token, and with an identity provider's JWT; the ratio of medians to "no auth".
3. Fair sharing: a quiet tenant's wait from its submit's answer to the first query of its task at the
   fake, with a busy tenant on the same key holding many open tasks (the key's query limit saturated),
   against the same wait with the busy tenant absent.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.common import PORTRAIT, SPEECH
from server.config import Settings, load_settings
from server.sandbox.fake_dashscope import FakeDashScope
from server.transport.http import TOKEN_ENV, build_http_app, http_security

KEYS = {"alice": "sk-bench-alice-000001", "bob": "sk-bench-bob-0000002", "shared": "sk-bench-shared-00003"}
TOKENS = {name: f"bench-token-{name}-{'y' * 24}" for name in ("alice", "bob", "busy", "quiet")}
SECRET = "9c4e1a7f3b2d8e6c0a5f9b1d7e3c2a8f4b6d0e9c1a7f5b3d2e8c6a0f4b9d1e7c"  # noqa: S105 (a bench link secret)
PUBLIC = "https://mcp.example.com"


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_tenants(folder: Path) -> Path:
    keys = {}
    for name, key in KEYS.items():
        keys[name] = folder / f"{name}.key"
        keys[name].write_text(key)
    text = ""
    for tenant, key in (("alice", "alice"), ("bob", "bob"), ("busy", "shared"), ("quiet", "shared")):
        text += f'[tenants.{tenant}]\ndashscope_key_file = "{keys[key]}"\ntoken_sha256 = ["{_sha(TOKENS[tenant])}"]\n'
    path = folder / "tenants.toml"
    path.write_text(text)
    return path


def settings_for(fake: FakeDashScope, folder: Path, **extra: str) -> Settings:
    env = {
        "DASHSCOPE_HTTP_BASE_URL": fake.base_url,
        "OUTPUT_DIR": str(folder / "output"),
        "HOME": str(folder / "home"),
        "EMO_MCP_POLL_INTERVAL": "0.2",
        **extra,
    }
    return load_settings(env, cwd=folder)


@contextlib.asynccontextmanager
async def served(settings: Settings, env: dict[str, str] | None = None) -> AsyncIterator[str]:
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    security = http_security("127.0.0.1", env or {})
    app = build_http_app(settings, security, env=env or {})
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, ws="none", log_level="error"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: server.serve(sockets=[sock]))
        while not server.started:  # noqa: ASYNC110 (uvicorn says it is up only by this flag)
            await anyio.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()


@contextlib.asynccontextmanager
async def client(base: str, token: str | None) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        Client(streamable_http_client(f"{base}/mcp", http_client=http)) as session,
    ):
        yield session


async def call(session: Client, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    result = await session.call_tool(name, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return dict(result.structured_content)


async def finished(session: Client) -> dict[str, Any]:
    detection = await call(session, "emo_detect", {"image_url": PORTRAIT})
    arguments = {"image_url": PORTRAIT, "audio_url": SPEECH, **{k: detection[k] for k in ("face_bbox", "ext_bbox")}}
    submitted = await call(session, "emo_generate", {**arguments, "allow_duplicate": True})
    return await call(session, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 30})


# ---------------------------------------------------------------------------------------- (1) walls


async def part_walls(folder: Path) -> list[tuple[str, bool]]:
    """Tenant bob tries each way at tenant alice's things; (attempt, refused or invisible)."""
    fake = FakeDashScope(api_key=KEYS["alice"], polls_to_finish=2)
    fake.extra_keys |= {KEYS["bob"], KEYS["shared"]}
    outcomes: list[tuple[str, bool]] = []
    async with fake.serve():
        settings = settings_for(
            fake,
            folder,
            EMO_MCP_TENANTS_FILE=str(write_tenants(folder)),
            EMO_MCP_PUBLIC_URL=PUBLIC,
            EMO_MCP_LINK_SECRET=SECRET,
        )
        async with served(settings) as base:
            async with client(base, TOKENS["alice"]) as alice:
                detection = await call(alice, "emo_detect", {"image_url": PORTRAIT})
                status = await finished(alice)
            task_id, link = status["task_id"], status["video_link"]
            boxes = {k: detection[k] for k in ("face_bbox", "ext_bbox")}
            async with client(base, TOKENS["bob"]) as bob:
                for what, name, arguments in (
                    ("task_status of alice's task", "task_status", {"task_id": task_id}),
                    ("task_cancel of alice's task", "task_cancel", {"task_id": task_id}),
                    (
                        "emo_generate with alice's boxes",
                        "emo_generate",
                        {"image_url": PORTRAIT, "audio_url": SPEECH, **boxes},
                    ),
                ):
                    result = await bob.call_tool(name, arguments)
                    outcomes.append((what, bool(result.is_error)))
                recent = json.loads((await bob.read_resource("tasks://recent")).contents[0].text)  # type: ignore[union-attr]
                outcomes.append(("tasks://recent lists alice's task", task_id not in json.dumps(recent)))
                try:
                    await bob.read_resource(f"tasks://{task_id}")
                    outcomes.append(("tasks://{alice's id}", False))
                except Exception:
                    outcomes.append(("tasks://{alice's id}", True))
                spend = json.loads((await bob.read_resource("spend://today")).contents[0].text)  # type: ignore[union-attr]
                outcomes.append(("spend://today shows alice's spend", spend["tasks"] == 0 and spend["detections"] == 0))
            bob_upstream = [r for r in fake.requests if r.headers.get("authorization") == f"Bearer {KEYS['bob']}"]
            outcomes.append(
                ("an upstream call with bob's key about alice's task", not any(task_id in r.path for r in bob_upstream))
            )
            local = base + link.removeprefix(PUBLIC)
            async with httpx2.AsyncClient() as raw:
                for what, url in (
                    ("alice's link with bob's name", local.replace("/videos/alice/", "/videos/bob/")),
                    ("alice's link with its signature altered", local.replace("sig=", "sig=Z")),
                    ("alice's link with a later expiry", local.replace("exp=", "exp=9")),
                    ("alice's video without a signature", local.split("?")[0]),
                ):
                    outcomes.append((what, (await raw.get(url)).status_code in (403, 404, 410)))
                for what, token in (("no token", None), ("a made-up token", "Bearer made-up-token-000000000000")):
                    headers = {
                        "Accept": "application/json, text/event-stream",
                        **({"Authorization": token} if token else {}),
                    }
                    answer = await raw.post(
                        f"{base}/mcp", headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
                    )
                    outcomes.append((f"tools/list with {what}", answer.status_code == 401))
    return outcomes


# ---------------------------------------------------------------------------------- (2) token cost


async def part_token_cost(folder: Path, rounds: int) -> dict[str, list[float]]:
    """Seconds per task_status call of a finished task, per kind of auth, in interleaved rounds."""
    fake = FakeDashScope(api_key=KEYS["alice"], polls_to_finish=1)
    fake.extra_keys |= {KEYS["bob"], KEYS["shared"]}
    shared_token = "bench-shared-token-0123456789abcdef"  # noqa: S105
    times: dict[str, list[float]] = {"no auth": [], "shared token": [], "tenant token": [], "identity provider JWT": []}
    # The project's own test issuer (keys made here, JWKS over loopback HTTP): the same one the tests use.
    from tests.issuer import LocalIssuer

    issuer = LocalIssuer(audience=f"{PUBLIC}/mcp").start()
    async with fake.serve(), contextlib.AsyncExitStack() as stack:
        stack.callback(issuer.stop)
        plain = settings_for(fake, folder / "plain", DASHSCOPE_API_KEY=KEYS["alice"])
        tenants = settings_for(fake, folder / "tenants", EMO_MCP_TENANTS_FILE=str(write_tenants(_mkdir(folder / "t"))))
        bases = {
            "no auth": (await stack.enter_async_context(served(plain)), None),
            "shared token": (
                await stack.enter_async_context(
                    served(
                        settings_for(fake, folder / "shared", DASHSCOPE_API_KEY=KEYS["alice"]),
                        {TOKEN_ENV: shared_token},
                    )
                ),
                shared_token,
            ),
            "tenant token": (await stack.enter_async_context(served(tenants)), TOKENS["alice"]),
        }
        oauth = settings_for(
            fake,
            folder / "oauth",
            EMO_MCP_TENANTS_FILE=str(write_tenants(_mkdir(folder / "o"))),
            EMO_MCP_OAUTH_ISSUER=issuer.url,
            EMO_MCP_PUBLIC_URL=PUBLIC,
        )
        bases["identity provider JWT"] = (
            await stack.enter_async_context(served(oauth)),
            issuer.token({"tenant": "alice", "exp": int(time.time()) + 3600}),
        )
        sessions: dict[str, tuple[Client, str]] = {}
        for kind, (base, token) in bases.items():
            session = await stack.enter_async_context(client(base, token))
            sessions[kind] = (session, (await finished(session))["task_id"])
        order = list(sessions)
        for index in range(rounds):
            for kind in order[index % len(order) :] + order[: index % len(order)]:
                session, task_id = sessions[kind]
                start = time.perf_counter()
                await call(session, "task_status", {"task_id": task_id})
                if index >= 10:  # warm-up rounds left out
                    times[kind].append(time.perf_counter() - start)
    return times


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------- (3) fair sharing


async def part_fairness(
    folder: Path, busy_tasks: int, trials: int, interval: float, qps: float
) -> dict[str, list[float]]:
    """The quiet tenant's waits (submit answered → first query at the fake), with and without the busy one."""
    waits: dict[str, list[float]] = {}
    for case in ("busy absent", "busy present"):
        fake = FakeDashScope(api_key=KEYS["shared"], polls_to_finish=10**9, auto_progress=False)
        work = _mkdir(folder / case.replace(" ", "-"))
        async with fake.serve():
            settings = settings_for(
                fake,
                work,
                EMO_MCP_TENANTS_FILE=str(write_tenants(work)),
                EMO_MCP_POLL_INTERVAL=str(interval),
                EMO_MCP_POLL_SCHEDULE="fixed",
                EMO_MCP_MAX_QUERY_QPS=str(qps),
                EMO_MCP_MODEL_QPS="emo-v1=50,emo-detect-v1=50",
            )
            async with served(settings) as base:
                if case == "busy present":
                    async with client(base, TOKENS["busy"]) as busy:
                        detection = await call(busy, "emo_detect", {"image_url": PORTRAIT})
                        arguments = {"image_url": PORTRAIT, "audio_url": SPEECH, "allow_duplicate": True}
                        arguments |= {k: detection[k] for k in ("face_bbox", "ext_bbox")}
                        for _ in range(busy_tasks):
                            await call(busy, "emo_generate", arguments)
                    await anyio.sleep(2 * interval)  # the busy tenant's polling is in full swing
                found: list[float] = []
                async with client(base, TOKENS["quiet"]) as quiet:
                    detection = await call(quiet, "emo_detect", {"image_url": PORTRAIT})
                    arguments = {"image_url": PORTRAIT, "audio_url": SPEECH, "allow_duplicate": True}
                    arguments |= {k: detection[k] for k in ("face_bbox", "ext_bbox")}
                    for _ in range(trials):
                        submitted = await call(quiet, "emo_generate", arguments)
                        answered = time.monotonic()
                        task_id = submitted["task_id"]
                        with anyio.fail_after(30 * interval):
                            # The fake records requests; it has no event to wait on.
                            while not (seen := [r.at for r in fake.requests if r.path.endswith(task_id)]):  # noqa: ASYNC110
                                await anyio.sleep(0.01)
                        found.append(seen[0] - answered)
                        await anyio.sleep(interval / 3)
                waits[case] = found
    return waits


# ------------------------------------------------------------------------------------------ report


def report(
    walls: list[tuple[str, bool]],
    times: dict[str, list[float]],
    waits: dict[str, list[float]],
    args: argparse.Namespace,
) -> str:
    refused = sum(1 for _, ok in walls if ok)
    lines = [
        "# Tenants (issue 15)",
        "",
        f"`python -m bench.tenants` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs)",
        "",
    ]
    lines += [
        f"## Cross-tenant attempts: {refused} of {len(walls)} refused or invisible",
        "",
        "| attempt | refused |",
        "|---|---|",
    ]
    lines += [f"| {what} | {'yes' if ok else '**NO**'} |" for what, ok in walls]
    base = statistics.median(times["no auth"])
    lines += ["", f"## Token checks per call ({len(times['no auth'])} interleaved rounds of task_status)", ""]
    lines += ["| auth | median | p90 | ratio to no auth |", "|---|---|---|---|"]
    for kind, values in times.items():
        ordered = sorted(values)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        middle = statistics.median(values)
        lines.append(f"| {kind} | {middle * 1000:.2f} ms | {p90 * 1000:.2f} ms | {middle / base:.3f}× |")
    lines += [
        "",
        f"## A quiet tenant beside a busy one on the same key ({args.busy_tasks} open busy tasks, "
        f"{args.qps:g} queries/s limit, poll interval {args.interval:g} s)",
        "",
    ]
    lines += ["| case | first query after submit: median | max |", "|---|---|---|"]
    for case, values in waits.items():
        lines.append(f"| {case} | {statistics.median(values):.2f} s | {max(values):.2f} s |")
    extra = max(waits["busy present"]) - max(waits["busy absent"])
    lines += [
        "",
        f"The busy tenant adds at most {extra:+.2f} s to the quiet tenant's first query "
        f"(goal: within one interval, {args.interval:g} s).",
    ]
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="emo-tenants-") as scratch:
        folder = Path(scratch)
        walls = await part_walls(_mkdir(folder / "walls"))
        times = await part_token_cost(_mkdir(folder / "cost"), args.rounds)
        waits = await part_fairness(_mkdir(folder / "fair"), args.busy_tasks, args.trials, args.interval, args.qps)
    return report(walls, times, waits, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--busy-tasks", type=int, default=200)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--qps", type=float, default=20.0)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("TENANTS.md"))
    args = parser.parse_args(argv)
    text = anyio.run(run, args)
    args.output.write_text(text, encoding="utf-8")
    print(text, end="")  # noqa: T201 (a bench's report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
