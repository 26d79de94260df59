"""Hosted for many people (issue 15): tenants with their own keys, budgets and walls, signed video links.

Everything goes through the real HTTP app (uvicorn on loopback) with the SDK's client, against the
loopback fake of DashScope, which accepts several accounts' keys and shows each account only its own
tasks; on SQLite and on a real PostgreSQL. Four tenants: alice and bob with keys of their own, carol
and dave sharing one key (dave with a tiny daily budget and only emo-v1 allowed).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextResourceContents

from server.config import Settings, load_settings
from server.errors import ConfigError
from server.sandbox.fake_dashscope import FakeDashScope
from server.tenancy.links import LinkSigner
from server.tenancy.tenants import TenantsFile, parse_tenants
from server.transport.http import http_security
from tests.apps import apps_extension, image_uri, video_uri
from tests.conftest import PORTRAIT, SPEECH, call_ok, detect_emo, detect_emoji, emo_arguments, make_env, text_of
from tests.serving import serving
from tests.tenancy import KEYS, PUBLIC, SECRET, TOKENS, sha

pytestmark = pytest.mark.anyio


def tenants_toml(keys: dict[str, Path], *, drop: str | None = None) -> str:
    """alice and bob on keys of their own, carol and dave on the shared one (dave: a tiny budget, emo-v1
    only); `drop`: that tenant's token hash removed (revoked)."""
    text = ""
    for tenant, key in (("alice", "alice"), ("bob", "bob"), ("carol", "shared"), ("dave", "shared")):
        hashes = "[]" if tenant == drop else json.dumps([sha(TOKENS[tenant])])
        text += f'\n[tenants.{tenant}]\ndashscope_key_file = "{keys[key]}"\ntoken_sha256 = {hashes}\n'
    return text + 'daily_budget_cny = 0.0001\nmodels = ["emo-v1"]\n'


@dataclass
class Hosted:
    base: str
    fake: FakeDashScope
    settings: Settings
    tenants_file: Path
    key_files: dict[str, Path]

    @contextlib.asynccontextmanager
    async def client(self, tenant: str, base: str | None = None, *, apps: bool = False) -> AsyncIterator[Client]:
        """An MCP session as `tenant`; `apps`: one that negotiated MCP Apps (the viewer's resources)."""
        headers = {"Authorization": f"Bearer {TOKENS[tenant]}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=30) as http,
            Client(
                streamable_http_client(f"{base or self.base}/mcp", http_client=http),
                extensions=[apps_extension()] if apps else [],
            ) as client,
        ):
            yield client

    def upstream(self, key: str, needle: str = "") -> list[Any]:
        """The fake's requests made with `key` whose path or body mentions `needle`."""
        return [
            r
            for r in self.fake.requests
            if r.headers.get("authorization") == f"Bearer {KEYS[key]}" and needle in (r.path + json.dumps(r.body))
        ]


def hosted_settings(
    fake: FakeDashScope, tmp_path: Path, database: str | None, **extra: str
) -> tuple[Settings, Path, dict[str, Path]]:
    keys = {}
    for name, key in KEYS.items():
        keys[name] = tmp_path / "secrets" / name
        keys[name].parent.mkdir(exist_ok=True)
        keys[name].write_text(key)
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(keys))
    env = make_env(
        fake,
        tmp_path,
        EMO_MCP_TENANTS_FILE=str(tenants),
        EMO_MCP_PUBLIC_URL=PUBLIC,
        EMO_MCP_LINK_SECRET=SECRET,
        **extra,
    )
    del env["DASHSCOPE_API_KEY"]
    if database is not None:
        env["EMO_MCP_DATABASE_URL"] = database
    return load_settings(env, cwd=tmp_path), tenants, keys


@pytest.fixture
async def hosted(accounts: FakeDashScope, tmp_path: Path, database: str | None) -> AsyncIterator[Hosted]:
    settings, tenants, keys = hosted_settings(accounts, tmp_path, database)
    async with serving(settings, http_security("127.0.0.1", {})) as base:
        yield Hosted(base, accounts, settings, tenants, keys)


async def finished_task(hosted: Hosted, tenant: str, base: str | None = None) -> dict[str, Any]:
    """Detect, generate and wait for the video as `tenant`; the task's status, with the detection."""
    async with hosted.client(tenant, base) as client:
        detection = await detect_emo(client)
        submitted = await call_ok(client, "emo_generate", emo_arguments(detection))
        status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 20})
    assert status["task_status"] == "SUCCEEDED", status
    return {**status, "detection": detection}


async def refused(client: Client, name: str, arguments: dict[str, Any]) -> str:
    result = await client.call_tool(name, arguments)
    assert result.is_error, result.structured_content
    return text_of(result)


async def resource(client: Client, uri: str) -> Any:
    (content,) = (await client.read_resource(uri)).contents
    assert isinstance(content, TextResourceContents)
    return json.loads(content.text)


async def test_every_cross_tenant_attempt_is_refused_or_invisible(hosted: Hosted) -> None:
    alice_task = await finished_task(hosted, "alice")
    task_id = alice_task["task_id"]
    # Each tenant's upstream calls carry its own key, and its files are under its own folder.
    assert hosted.upstream("alice", "emo-v1") and not hosted.upstream("bob")
    assert Path(alice_task["video_path"]).is_relative_to(hosted.settings.output_dir / "tenants" / "alice")

    async with hosted.client("bob") as bob:
        made_up = "0f0f0f0f-1111-2222-3333-444444444444"
        unknown = (await refused(bob, "task_status", {"task_id": made_up})).replace(made_up, "<id>")
        other = (await refused(bob, "task_status", {"task_id": task_id})).replace(task_id, "<id>")
        assert other == unknown  # answered exactly as for an id that does not exist
        cancel = (await refused(bob, "task_cancel", {"task_id": task_id})).replace(task_id, "<id>")
        assert cancel == unknown
        # Alice's boxes are no provenance for bob: refused before anything is sent.
        boxes = await refused(bob, "emo_generate", emo_arguments(alice_task["detection"]))
        assert "emo_detect" in boxes
        recent = await resource(bob, "tasks://recent")
        assert recent["tasks"] == []
        with pytest.raises(Exception, match="not in this server's ledger"):
            await bob.read_resource(f"tasks://{task_id}")
        spend = await resource(bob, "spend://today")
        assert spend["tenant"] == "bob" and spend["tasks"] == 0 and spend["detections"] == 0
    audit = [json.loads(line) for line in (hosted.settings.output_dir / "audit.jsonl").read_text().splitlines()]
    assert {"tenant": "bob", "reason": "cross-tenant", "task_id": task_id} in [
        {k: line.get(k) for k in ("tenant", "reason", "task_id")} for line in audit
    ]
    assert {"tenant": "bob", "tool": "emo_generate", "reason": "provenance"} in [
        {k: line.get(k) for k in ("tenant", "tool", "reason")} for line in audit
    ]
    # Never asked upstream about alice's task with bob's key, and bob sent no generate at all.
    assert hosted.upstream("bob", task_id) == [] and hosted.upstream("bob", "emo-v1") == []

    # The viewer reads only the asking tenant's portraits and videos.
    async with hosted.client("bob", apps=True) as viewer:
        with pytest.raises(Exception, match="not in this server's ledger"):
            await viewer.read_resource(video_uri(task_id))
        with pytest.raises(Exception, match="No detection of this image_url"):
            await viewer.read_resource(image_uri(PORTRAIT))
    async with hosted.client("alice", apps=True) as viewer:
        (shown,) = (await viewer.read_resource(video_uri(task_id))).contents
        assert shown.mime_type == "video/mp4"
    async with hosted.client("alice") as alice:
        mine = await resource(alice, "tasks://recent")
        assert [t["task_id"] for t in mine["tasks"]] == [task_id]
        assert (await resource(alice, f"tasks://{task_id}"))["video_link"].startswith(f"{PUBLIC}/videos/alice/")


async def test_tenants_on_one_key_cannot_see_each_others_tasks(hosted: Hosted) -> None:
    carol_task = await finished_task(hosted, "carol")
    task_id = carol_task["task_id"]
    queries_before = len(hosted.upstream("shared", task_id))
    async with hosted.client("dave") as dave:
        made_up = "0e0e0e0e-1111-2222-3333-444444444444"
        unknown = (await refused(dave, "task_status", {"task_id": made_up})).replace(made_up, "<id>")
        other = (await refused(dave, "task_status", {"task_id": task_id})).replace(task_id, "<id>")
        assert other == unknown
        assert (await refused(dave, "task_cancel", {"task_id": task_id})).replace(task_id, "<id>") == unknown
        assert (await resource(dave, "tasks://recent"))["tasks"] == []
    # The shared key was not used for carol's task on dave's behalf (carol's task is settled: no polling).
    assert len(hosted.upstream("shared", task_id)) == queries_before


async def test_signed_links_serve_only_their_own_video(hosted: Hosted) -> None:
    status = await finished_task(hosted, "alice")
    link = status["video_link"]
    assert link.startswith(f"{PUBLIC}/videos/alice/{status['task_id']}/")
    local = hosted.base + link.removeprefix(PUBLIC)
    video = Path(status["video_path"]).read_bytes()
    async with httpx2.AsyncClient(timeout=10) as raw:
        full = await raw.get(local)
        assert full.status_code == 200 and full.content == video
        assert full.headers["content-type"] == "video/mp4"
        part = await raw.get(local, headers={"Range": "bytes=10-99"})
        assert part.status_code == 206 and part.content == video[10:100]
        altered = local.replace("sig=", "sig=A")
        assert (await raw.get(altered)).status_code == 403
        assert (await raw.get(local.replace("/videos/alice/", "/videos/bob/"))).status_code == 403
        assert (await raw.get(local.split("?")[0])).status_code == 403
        signer = LinkSigner(bytes.fromhex(SECRET), hosted.base)
        name = Path(status["video_path"]).name
        expired = LinkSigner(bytes.fromhex(SECRET), hosted.base, ttl=1, clock=lambda: time.time() - 100)
        assert (await raw.get(expired.link("alice", status["task_id"], name))).status_code == 410
        # Even a correctly signed link for bob does not reach alice's video: bob's ledger has no such task.
        assert (await raw.get(signer.link("bob", status["task_id"], name))).status_code == 404
    async with hosted.client("alice") as alice:
        result = await alice.call_tool("task_status", {"task_id": status["task_id"]})
    uris = [str(getattr(block, "uri", "")) for block in result.content]
    assert any(uri.startswith("file://") for uri in uris) and link.split("?")[0] in " ".join(uris)


async def test_budget_and_model_refusals_send_nothing_and_are_audited(hosted: Hosted) -> None:
    async with hosted.client("dave") as dave:
        detection = await detect_emo(dave)
        budget = await refused(dave, "emo_generate", emo_arguments(detection))
        assert "daily budget of 0.0001 CNY" in budget and "resets at" in budget and "T00:00:00" in budget
        emoji = await detect_emoji(dave)
        model = await refused(
            dave,
            "emoji_generate",
            {
                "image_url": PORTRAIT,
                "face_bbox": emoji["face_bbox"],
                "ext_bbox_face": emoji["ext_bbox_face"],
                "template_id": "mengwa_kaixin",
            },
        )
        assert "may not use emoji-v1" in model
        spend = await resource(dave, "spend://today")
        assert spend["budget"]["daily_budget_cny"] == 0.0001 and spend["budget"]["models"] == ["emo-v1"]
    generates = [r for r in hosted.upstream("shared") if "generation" in r.path or "video-synthesis" in r.path]
    assert generates == []
    lines = [json.loads(line) for line in (hosted.settings.output_dir / "audit.jsonl").read_text().splitlines()]
    reasons = {(line["tenant"], line["tool"], line["outcome"], line.get("reason")) for line in lines}
    assert ("dave", "emo_generate", "refused", "budget") in reasons
    assert ("dave", "emo_detect", "sent", None) in reasons
    assert all(KEYS["shared"] not in json.dumps(line) and TOKENS["dave"] not in json.dumps(line) for line in lines)


async def test_a_revoked_token_is_refused_within_seconds(hosted: Hosted) -> None:
    async with hosted.client("alice") as alice:
        await alice.list_tools()
    hosted.tenants_file.write_text(tenants_toml(hosted.key_files, drop="alice"))
    async with httpx2.AsyncClient(timeout=10) as raw:
        with anyio.fail_after(10):
            while True:
                answer = await raw.post(
                    f"{hosted.base}/mcp",
                    headers={
                        "Authorization": f"Bearer {TOKENS['alice']}",
                        "Accept": "application/json, text/event-stream",
                    },
                    json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
                )
                if answer.status_code == 401:
                    break
                await anyio.sleep(0.2)
        assert 'error="invalid_token"' in answer.headers["www-authenticate"]
        # A file that turns malformed is refused: the last good one (bob still in) stays in force.
        hosted.tenants_file.write_text("[tenants.bob\nbroken")
        await anyio.sleep(2.5)
    async with hosted.client("bob") as bob:
        await bob.list_tools()


def test_a_malformed_tenants_file_names_the_tenant_and_field(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk-x")
    good = f'[tenants.alice]\ndashscope_key_file = "{key}"\ntoken_sha256 = ["{"a" * 64}"]\n'
    assert parse_tenants(good, {}, origin="t")["alice"].api_key == "sk-x"
    cases = {
        "[tenants.Alice]\ndashscope_key_env = 'K'\n": "'Alice'",
        "[tenants.alice]\ntoken_sha256 = ['" + "a" * 64 + "']\n": "dashscope_key_env",
        "[tenants.alice]\ndashscope_key_env = 'NOT_SET'\ntoken_sha256 = ['" + "a" * 64 + "']\n": "NOT_SET",
        good.replace('"a', '"A'): "lowercase hex",
        good + "daily_budget = 5\n": "daily_budget",
        good + "models = ['emo-detect-v1']\n": "models",
        good + "max_cost_cny = -1\n": "max_cost_cny",
        "[tenants.alice\n": "not valid TOML",
    }
    for text, named in cases.items():
        with pytest.raises(ConfigError, match=named):
            parse_tenants(text, {}, origin="t")
    # While running: a malformed file is refused and the last good one stays in force.
    path = tmp_path / "tenants.toml"
    path.write_text(good)
    tenants = TenantsFile(path, {})
    path.write_text("[tenants.alice\n")
    assert tenants.refresh() is False and "alice" in tenants.tenants


async def test_a_tenant_without_its_key_stops_the_server_at_start(accounts: FakeDashScope, tmp_path: Path) -> None:
    settings, tenants, _ = hosted_settings(accounts, tmp_path, None)
    tenants.write_text(
        tenants.read_text() + '\n[tenants.erin]\ndashscope_key_env = "ERIN_KEY_UNSET"\ntoken_sha256 = []\n'
    )
    from server.transport.http import build_http_app

    with pytest.raises(ConfigError, match=r"tenant 'erin'.*ERIN_KEY_UNSET"):
        build_http_app(settings, http_security("127.0.0.1", {}), env={})


async def test_two_workers_keep_the_walls_and_serve_each_others_links(
    accounts: FakeDashScope, tmp_path: Path, database: str | None
) -> None:
    settings, tenants, keys = hosted_settings(accounts, tmp_path, database)
    security = http_security("127.0.0.1", {})
    async with serving(settings, security) as first, serving(settings, security) as second:
        hosted = Hosted(first, accounts, settings, tenants, keys)
        status = await finished_task(hosted, "alice")
        async with hosted.client("alice", second) as alice:
            again = await call_ok(alice, "task_status", {"task_id": status["task_id"]})
            assert again["video_path"] == status["video_path"]
        async with hosted.client("bob", second) as bob:
            text = await refused(bob, "task_status", {"task_id": status["task_id"]})
            assert "not in this server's ledger" in text
        async with httpx2.AsyncClient(timeout=10) as raw:
            served = await raw.get(second + status["video_link"].removeprefix(PUBLIC))
        assert served.status_code == 200 and served.content == Path(status["video_path"]).read_bytes()


async def test_a_quiet_tenant_waits_behind_one_call_of_a_busy_one_not_its_queue() -> None:
    """Tenants on one key share its limiter: turns go round them, so a quiet tenant's first query is not
    queued behind every query a busy tenant has waiting (measured end to end in bench/TENANTS.md)."""
    from server.upstream.limits import RateLimiter

    limiter = RateLimiter(50.0)
    granted: list[str] = []

    async def one(party: str, label: str) -> None:
        await limiter.acquire(party)
        granted.append(label)

    async with anyio.create_task_group() as tg:
        for index in range(20):
            tg.start_soon(one, "busy", f"busy-{index}")
        await anyio.sleep(0.05)  # the busy tenant's queue is long now
        arrived_after = len(granted)
        tg.start_soon(one, "quiet", "quiet")
    assert granted.index("quiet") <= arrived_after + 2, granted
    assert len(granted) == 21


async def test_log_lines_name_the_tenant_and_never_its_key(
    accounts: FakeDashScope, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    settings, tenants, keys = hosted_settings(accounts, tmp_path, None)
    async with serving(settings, http_security("127.0.0.1", {})) as base:
        await finished_task(Hosted(base, accounts, settings, tenants, keys), "alice")
    logged = "\n".join(record.getMessage() for record in caplog.records)
    # Whatever is logged on a tenant's behalf (its requests, its watcher: the context variable) names it.
    import logging

    from server.tenancy.current import current_tenant

    reset = current_tenant.set("bob")
    try:
        logging.getLogger("server.jobs.watcher").warning("task %s: query failed", "t-1")
    finally:
        current_tenant.reset(reset)
    assert caplog.records[-1].getMessage() == "tenant=bob task t-1: query failed"
    assert "tenant=alice" in logged
    assert not any(key in logged for key in KEYS.values())
    assert not any(token in logged for token in TOKENS.values())


async def test_a_tenant_added_while_running_is_served_within_seconds(hosted: Hosted) -> None:
    erin_key = hosted.key_files["bob"].with_name("erin")
    erin_key.write_text(KEYS["bob"])
    token = "token-of-erin-" + "z" * 24
    hosted.tenants_file.write_text(
        tenants_toml(hosted.key_files)
        + f'\n[tenants.erin]\ndashscope_key_file = "{erin_key}"\ntoken_sha256 = ["{sha(token)}"]\n'
    )
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient(timeout=10) as raw:
        with anyio.fail_after(10):
            while True:
                body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
                if (await raw.post(f"{hosted.base}/mcp", headers=headers, json=body)).status_code == 200:
                    break
                await anyio.sleep(0.2)
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(streamable_http_client(f"{hosted.base}/mcp", http_client=http)) as erin,
    ):
        await detect_emo(erin)
        assert (await resource(erin, "spend://today"))["tenant"] == "erin"
    assert (hosted.settings.output_dir / "tenants" / "erin").is_dir()


def test_the_command_refuses_a_bad_tenants_file_with_one_clear_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[tenants.alice]\ndashscope_key_env = "EMO_TEST_UNSET_KEY"\ntoken_sha256 = []\n')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUTPUT_DIR": str(tmp_path / "out")}
    env["EMO_MCP_TENANTS_FILE"] = str(tenants)
    done = subprocess.run(
        [sys.executable, "-m", "server", "--transport", "http", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=60,
    )
    assert done.returncode != 0 and done.stdout == ""
    assert "tenant 'alice'" in done.stderr and "EMO_TEST_UNSET_KEY" in done.stderr
    assert "Traceback" not in done.stderr


async def test_generates_racing_on_two_workers_for_the_last_of_a_budget_never_overspend(
    accounts: FakeDashScope, tmp_path: Path, database: str | None
) -> None:
    settings, tenants, keys = hosted_settings(accounts, tmp_path, database)
    security = http_security("127.0.0.1", {})
    async with serving(settings, security) as first, serving(settings, security) as second:
        hosted = Hosted(first, accounts, settings, tenants, keys)
        async with hosted.client("carol") as carol:
            detection = await detect_emo(carol)
            dry = await call_ok(carol, "emo_generate", {**emo_arguments(detection), "dry_run": True})
        # Room for the detection and one job, not two (re-read from the file by both workers).
        budget = round(0.004 * 4 + dry["estimated_cost_cny"] * 1.5, 4)
        tenants.write_text(
            tenants.read_text().replace("[tenants.carol]\n", f"[tenants.carol]\ndaily_budget_cny = {budget}\n")
        )
        await anyio.sleep(2.5)
        outcomes: list[bool] = []

        async def one(base: str, audio: str) -> None:
            async with hosted.client("carol", base) as client:
                result = await client.call_tool(
                    "emo_generate", {**emo_arguments(detection, audio), "allow_duplicate": True}
                )
                outcomes.append(not result.is_error)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one, first, SPEECH)
                tg.start_soon(one, second, SPEECH)
        # At most one fitted (two racing calls that each see the other's row are both refused, so it may be
        # none); when none did, the budget still has room for one.
        assert sum(outcomes) <= 1, outcomes
        if not any(outcomes):
            await one(first, SPEECH)
            assert outcomes[-1], "the budget had room for one job"
    submits = [r for r in hosted.upstream("shared") if r.method == "POST" and "video-synthesis" in r.path]
    assert len(submits) == 1
