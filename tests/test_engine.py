"""The job engine's cost follows the work, not the history: indexed lookups, a due queue, an ETA.

The query-plan tests run the real hot paths (a watcher's ticks, task_status, resources, spend) on a
ledger with a long history, record every statement the connection ran, and ask SQLite how it
would execute each: none may scan the tasks or detections tables.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import ProgressNotificationParams

from server.app import create_app
from server.config import load_settings
from server.errors import ConfigError
from server.jobs.schedule import Eta, estimate, keep_cadence, learned_rate, next_query
from server.jobs.task_views import recent_views
from server.runtime import open_service
from server.sandbox.account import SimulatedAccount
from server.sandbox.fake_dashscope import EMO_MODEL, FakeDashScope
from server.store.evidence import Evidence
from server.store.ledger import Ledger
from server.store.queue import DueQueue, Entry, Rate
from server.store.spend import record_estimate, spend_today
from tests import media_files
from tests.conftest import PORTRAIT, SPEECH, TEST_KEY, call_ok, detect_emo, make_env

pytestmark = pytest.mark.anyio

HISTORY = 3000


def history(output: Path, finished: int = HISTORY) -> None:
    """Finished tasks and detections, written through the storage API (never known to the fake)."""
    output.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(output)
    evidence = Evidence(output, TEST_KEY)
    for index in range(finished):
        task_id = str(uuid.uuid4())
        ledger.add_detection(
            family="emo",
            model="emo-detect-v1",
            image_url=f"https://images.example.com/old/{index}.jpg",
            ratio="1:1",
            check_pass=True,
            face_bbox=[1, 1, 50, 50],
            ext_bbox=[0, 0, 60, 60],
            code=None,
            message=None,
            request_id=None,
            evidence_dir=str(output),
        )
        ledger.add_task(
            task_id=task_id,
            family="emo",
            model=EMO_MODEL,
            payload={},
            ratio="1:1",
            status="SUCCEEDED",
            request_id=None,
            evidence_dir=str(evidence.task_path("emo", task_id)),
            fingerprint=hashlib.sha256(task_id.encode()).hexdigest(),
        )
        ledger.update_task(task_id, video_path=str(output / "gone.mp4"), code="VideoExpired", video_url="x")
    ledger.close()


def full_scans(ledger: Ledger, statements: list[str]) -> list[tuple[str, str]]:
    """(statement, plan line) for every plan step that reads a whole tasks/detections table."""
    found = []
    for sql in statements:
        if not re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT)", sql, re.IGNORECASE) or "EXPLAIN" in sql:
            continue
        for row in ledger.execute("EXPLAIN QUERY PLAN " + sql):
            detail = str(row[3])
            if re.match(r"SCAN (tasks|detections)\b", detail) and "INDEX" not in detail:
                found.append((sql, detail))
    return found


async def test_hot_paths_never_scan_the_history(fake: FakeDashScope, tmp_path: Path) -> None:
    history(tmp_path / "output")
    settings = load_settings(make_env(fake, tmp_path), cwd=tmp_path)
    statements: list[str] = []
    with anyio.fail_after(60):
        async with open_service(settings) as service:
            service.ledger.trace(statements.append)
            detection = await service.emo_detect(PORTRAIT)
            assert detection.face_bbox is not None and detection.ext_bbox is not None
            submitted = await service.emo_generate(PORTRAIT, SPEECH, detection.face_bbox, detection.ext_bbox)
            assert submitted.task_id is not None
            finished = await service.task_status(submitted.task_id, wait_seconds=20)
            assert finished.video_path is not None
            await service.emo_generate(PORTRAIT, SPEECH, detection.face_bbox, detection.ext_bbox, dry_run=True)
            await service.task_status(submitted.task_id)
            recent_views(service.ledger, settings.prices)
            spend_today(service.ledger, settings.prices)
            await anyio.sleep(0.3)  # a few idle ticks of the watcher
            service.ledger.trace(None)
            assert len(statements) > 50
            assert full_scans(service.ledger, statements) == []


async def test_finished_history_is_never_queried(fake: FakeDashScope, tmp_path: Path) -> None:
    history(tmp_path / "output", 500)
    settings = load_settings(make_env(fake, tmp_path), cwd=tmp_path)
    with anyio.fail_after(30):
        async with Client(create_app(settings)) as client:
            submitted = await call_ok(client, "emo_generate", emo_args(await detect_emo(client)))
            done = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 20})
    assert done["task_status"] == "SUCCEEDED"
    queried = {r.path.rsplit("/", 1)[-1] for r in fake.requests if r.method == "GET" and "/tasks/" in r.path}
    assert queried == {submitted["task_id"]}


def emo_args(detection: dict[str, Any], audio_url: str = SPEECH) -> dict[str, Any]:
    return {"image_url": PORTRAIT, "audio_url": audio_url, **{k: detection[k] for k in ("face_bbox", "ext_bbox")}}


async def test_a_ledger_from_before_the_queue_has_its_open_tasks_followed(fake: FakeDashScope, tmp_path: Path) -> None:
    fake.auto_progress = False
    settings = load_settings(make_env(fake, tmp_path), cwd=tmp_path)
    async with Client(create_app(settings)) as client:
        submitted = await call_ok(client, "emo_generate", emo_args(await detect_emo(client)))
    task_id = submitted["task_id"]
    # As an older release left it: the task open, in a flat folder, and no due queue at all.
    flat = settings.output_dir / "aliyun-emo" / "tasks" / task_id
    Path(submitted["evidence_dir"]).rename(flat)
    ledger = Ledger(settings.output_dir)
    ledger.execute("DROP TABLE due_queue")
    ledger.execute("DROP TABLE due_queue_meta")
    ledger.execute("DROP TABLE schema_migrations")  # as before versioned migrations: adopted on open
    ledger.execute("UPDATE tasks SET evidence_dir = ? WHERE task_id = ?", (str(flat), task_id))
    ledger.close()
    fake.complete(task_id)
    with anyio.fail_after(30):
        async with Client(create_app(settings)) as client:
            done = await call_ok(client, "task_status", {"task_id": task_id, "wait_seconds": 20})
    assert done["task_status"] == "SUCCEEDED"
    assert Path(done["video_path"]) == flat / f"{task_id}.mp4"  # the recorded (flat) folder stays valid
    assert hashlib.sha256(Path(done["video_path"]).read_bytes()).hexdigest() == fake.video_sha256(task_id)


async def test_evidence_is_sharded_by_day(client: Client, tmp_path: Path) -> None:
    detection = await detect_emo(client)
    submitted = await call_ok(client, "emo_generate", emo_args(detection))
    for folder, kind in ((Path(detection["evidence_dir"]), "detect"), (Path(submitted["evidence_dir"]), "tasks")):
        shard = folder.parent
        assert re.fullmatch(r"\d{8}", shard.name), folder
        assert shard.parent == tmp_path / "output" / "aliyun-emo" / kind


async def test_a_fresh_status_does_not_wait_behind_a_slow_query(fake: FakeDashScope, tmp_path: Path) -> None:
    fake.auto_progress = False
    settings = load_settings(make_env(fake, tmp_path, EMO_MCP_POLL_INTERVAL="60"), cwd=tmp_path)
    with anyio.fail_after(20):
        async with Client(create_app(settings)) as client:
            submitted = await call_ok(client, "emo_generate", emo_args(await detect_emo(client)))
            task_id = submitted["task_id"]
            await call_ok(client, "task_status", {"task_id": task_id})
            fake.inject("GET", f"/tasks/{task_id}", delay=8, passthrough=True, times=5)
            started = time.monotonic()
            status = await call_ok(client, "task_status", {"task_id": task_id})
            answered = time.monotonic() - started
    assert status["task_status"] == "PENDING"
    assert answered < 8  # the ledger's answer, not the 8 s upstream one
    fake.clear_injections()


def test_the_schedule_polls_sparsely_far_from_the_end_and_densely_near_it() -> None:
    eta = Eta(start=1000.0, end=1100.0, basis="")
    far = next_query(schedule="adaptive", began=1000.0, eta=eta, interval=15, max_interval=60) - 1000.0
    near = next_query(schedule="adaptive", began=1095.0, eta=eta, interval=15, max_interval=60) - 1095.0
    late = next_query(schedule="adaptive", began=1500.0, eta=eta, interval=15, max_interval=60) - 1500.0
    fixed = next_query(schedule="fixed", began=1000.0, eta=eta, interval=15, max_interval=60) - 1000.0
    unknown = next_query(schedule="adaptive", began=1000.0, eta=None, interval=15, max_interval=60) - 1000.0
    assert 15 < far <= 60 and near == 15 / 8 and late == 15 and fixed == 15 and unknown == 15
    queued = Eta(start=1400.0, end=1500.0, basis="", queued=True)
    assert next_query(schedule="adaptive", began=1000.0, eta=queued, interval=15, max_interval=60) == 1060.0
    capped = Eta(start=1000.0, end=100000.0, basis="")
    assert next_query(schedule="adaptive", began=1000.0, eta=capped, interval=15, max_interval=60) == 1060.0


def test_the_next_query_counts_from_the_due_time_so_the_cadence_holds_but_never_crowds_the_last_answer() -> None:
    # Asked 20 ms early (a tick's look-ahead) or 30 ms late (its turn at the limit): still due every 0.5 s.
    assert keep_cadence(1000.48 + 0.5, began=1000.48, was_due=1000.5, now=1000.49) == 1001.0
    assert keep_cadence(1000.53 + 0.5, began=1000.53, was_due=1000.5, now=1000.54) == 1001.0
    # Its answer came 0.4 s late (a stalled loop, a slow upstream): the next is 0.75 of a delay after it,
    # not 0.1 s after it, and not a full delay plus the lag either.
    assert keep_cadence(1000.6 + 0.5, began=1000.6, was_due=1000.5, now=1000.9) == 1000.9 + 0.375
    # Nothing to shift when the schedule says "now" (a retry, a task already due).
    assert keep_cadence(1000.0, began=1000.6, was_due=1000.5, now=1000.9) == 1000.0


def test_the_rate_is_learned_from_finished_tasks() -> None:
    prior, basis = learned_rate(EMO_MODEL, Rate(0, 0.0, 0.0), prior=True)
    assert prior == 8.5 and "prior" in basis
    learned, basis = learned_rate(EMO_MODEL, Rate(10, 100.0, 200.0), prior=True)
    assert learned is not None and 2.0 < learned < 8.5 and "10 finished" in basis
    assert learned_rate(EMO_MODEL, Rate(0, 0.0, 0.0), prior=False)[0] is None
    entry = Entry("t", EMO_MODEL, 0.0, "query", 0.0, 10.0, None, None, None)
    queued = estimate(
        entry, now=50.0, status="PENDING", scheduled=None, ahead_end=80.0, ahead_count=2, rate=2.0, rate_basis="r"
    )
    assert (queued.start, queued.end) == (80.0, 100.0) and "2 task(s)" in queued.basis


def test_the_schedule_setting_is_checked(tmp_path: Path) -> None:
    env = {"DASHSCOPE_API_KEY": TEST_KEY, "OUTPUT_DIR": str(tmp_path / "o"), "EMO_MCP_POLL_SCHEDULE": "fixed"}
    assert load_settings(env, cwd=tmp_path).poll_schedule == "fixed"
    assert load_settings({**env, "EMO_MCP_POLL_SCHEDULE": ""}, cwd=tmp_path).poll_schedule == "adaptive"
    with pytest.raises(ConfigError, match="EMO_MCP_POLL_SCHEDULE"):
        load_settings({**env, "EMO_MCP_POLL_SCHEDULE": "sometimes"}, cwd=tmp_path)


async def test_task_status_reports_an_eta_and_progress_counts_towards_it(tmp_path: Path) -> None:
    account = SimulatedAccount(api_key=TEST_KEY, rate=1.0, noise=0.0)
    media = tmp_path / "media"
    portrait = media_files.image(media / "face.png", (800, 1000))
    audio = media_files.wav(media / "speech.wav", 2.0)
    async with account.serve():
        env = make_env(account, tmp_path, EMO_MCP_ALLOWED_ROOTS=str(media), EMO_MCP_POLL_INTERVAL="0.2")
        settings = load_settings(env, cwd=tmp_path)
        ledger = Ledger(settings.state_dir)
        DueQueue(ledger).learn(EMO_MODEL, 10.0, 10.0)  # one finished task taught 1 s per output second
        ledger.close()
        seen: list[ProgressNotificationParams] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(ProgressNotificationParams(progress_token=0, progress=progress, total=total, message=message))

        with anyio.fail_after(30):
            async with Client(create_app(settings)) as client:
                found = await call_ok(client, "emo_detect", {"image_url": portrait.as_uri()})
                args = {"image_url": portrait.as_uri(), "audio_url": audio.as_uri()}
                args |= {"face_bbox": found["face_bbox"], "ext_bbox": found["ext_bbox"]}
                submitted = await call_ok(client, "emo_generate", args)
                status = await call_ok(client, "task_status", {"task_id": submitted["task_id"]})
                assert status["eta_seconds"] is not None and 0 < status["eta_seconds"] <= 3
                assert status["expected_end"].endswith("Z")
                assert "output 2 s" in status["eta_basis"] and "1 finished" in status["eta_basis"]
                result = await client.call_tool(
                    "task_status", {"task_id": submitted["task_id"], "wait_seconds": 20}, progress_callback=on_progress
                )
    assert result.structured_content is not None and result.structured_content["task_status"] == "SUCCEEDED"
    fractions = [p.progress / p.total for p in seen if p.total]
    assert fractions and all(0 < f <= 1 for f in fractions)
    assert any("left" in (p.message or "") for p in seen)


def test_spend_today_never_counts_a_task_that_will_not_be_billed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    for status in ("NOT_FOUND", "FAILED", "PENDING"):
        task_id = f"{status.lower()}-task"
        ledger.add_task(
            task_id=task_id,
            family="emo",
            model=EMO_MODEL,
            payload={},
            ratio="1:1",
            status=status,
            request_id=None,
            evidence_dir=str(tmp_path),
        )
        record_estimate(ledger, task_id, "emo", 0.5, "test")
    summary = spend_today(ledger)
    ledger.close()
    assert summary.tasks == 3 and summary.unfinished_tasks == 1 and summary.total_cny == 0.5
