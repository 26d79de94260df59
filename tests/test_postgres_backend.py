"""The PostgreSQL ledger under concurrency and at start-up, against a real server (tests/postgres.py).

Workers that start together migrate one empty schema once; claimers never share a task (`FOR UPDATE
SKIP LOCKED`); identical submits racing from separate connections insert one row (the unique index),
and every loser gets the winner's row. The whole chain runs over MCP with the ledger in PostgreSQL,
`db import-sqlite` copies an older SQLite ledger idempotently, and an unreachable URL stops the server
at once with one line. SQLite start-up never imports psycopg.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from mcp import Client

from server.app import create_app
from server.config import load_settings
from server.sandbox.fake_dashscope import FakeDashScope
from server.store.ledger import LEDGER_FILE, Ledger
from server.store.migrations import latest
from server.store.queue import DueQueue
from tests.conftest import PORTRAIT, SPEECH, call_ok, detect_emo, make_env
from tests.postgres import needs_postgres
from tests.test_migrations import OPEN, old_ledger

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 8


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def together(count: int, job: Any) -> list[Any]:
    """Run `job(index)` in `count` threads released at one moment; their results in order."""
    barrier, results, errors = threading.Barrier(count), [None] * count, []

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = job(index)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return results


@needs_postgres
def test_workers_starting_together_migrate_an_empty_database_once(pg_url: str, tmp_path: Path) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN, str(tmp_path), pg_url], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(WORKERS)
    ]
    versions = [child.communicate(timeout=60)[0].strip() for child in children]
    assert [child.returncode for child in children] == [0] * WORKERS
    assert versions == [str(latest("postgresql"))] * WORKERS
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [row[0] for row in rows] == list(range(1, latest("postgresql") + 1))
    assert not (tmp_path / LEDGER_FILE).exists()  # nothing of the ledger lands in the state folder


@needs_postgres
def test_soft_writes_do_not_wait_for_the_disk_and_every_other_write_does(pg_url: str, tmp_path: Path) -> None:
    """`durable=False` (the watcher's bookkeeping) switches the pooled session's synchronous_commit off;
    the next durable write or transaction on any pooled connection has it on again."""
    ledger = Ledger(tmp_path, pg_url)
    try:
        for _ in range(3):  # whichever pooled connection each call borrows
            assert ledger.execute("SHOW synchronous_commit", durable=False)[0][0] == "off"
            assert ledger.execute("SHOW synchronous_commit")[0][0] == "on"
            ledger.execute("SHOW synchronous_commit", durable=False)
            with ledger.transaction() as tx:
                assert tx.execute("SHOW synchronous_commit")[0][0] == "on"
    finally:
        ledger.close()


@needs_postgres
def test_concurrent_claimers_never_get_the_same_task(pg_url: str, tmp_path: Path) -> None:
    ledgers = [Ledger(tmp_path, pg_url) for _ in range(WORKERS)]
    try:
        queue = DueQueue(ledgers[0])
        for index in range(300):
            queue.schedule(f"task-{index:03d}", "emo-v1", 1000.0 + index, 500.0 + index % 7)

        def claim_all(worker: int) -> list[str]:
            mine, own = [], DueQueue(ledgers[worker])
            while got := own.claim(2000.0, 3, 600.0, f"worker-{worker}"):
                mine += got
            return mine

        claimed = together(WORKERS, claim_all)
    finally:
        for ledger in ledgers:
            ledger.close()
    counts = Counter(task for mine in claimed for task in mine)
    assert len(counts) == 300 and set(counts.values()) == {1}  # every task claimed, none twice
    assert sum(1 for mine in claimed if mine) > 1  # the claims really ran side by side


@needs_postgres
def test_identical_submits_racing_insert_one_row_and_all_get_it(pg_url: str, tmp_path: Path) -> None:
    ledgers = [Ledger(tmp_path, pg_url) for _ in range(WORKERS)]
    try:
        for round_ in range(5):

            def begin(worker: int, round_: int = round_) -> str | None:
                found = ledgers[worker].begin_submit(
                    local_id=f"submit-{round_}-{worker}",
                    family="emo",
                    model="emo-v1",
                    payload={"round": round_},
                    ratio="1:1",
                    fingerprint=f"fp-{round_}",
                    evidence_dir="/e",
                    owner=f"worker-{worker}",
                    allow_duplicate=False,
                )
                return None if found is None else found.task_id

            answers = together(WORKERS, begin)
            assert answers.count(None) == 1, answers  # one insert won
            winner = f"submit-{round_}-{answers.index(None)}"
            assert {answer for answer in answers if answer is not None} == {winner}
            rows = ledgers[0].query("SELECT task_id FROM tasks WHERE fingerprint = ?", (f"fp-{round_}",))
            assert [row[0] for row in rows] == [winner]
    finally:
        for ledger in ledgers:
            ledger.close()


@needs_postgres
@pytest.mark.anyio
async def test_the_chain_runs_over_mcp_with_the_ledger_in_postgres(
    fake: FakeDashScope, tmp_path: Path, pg_url: str
) -> None:
    settings = load_settings(make_env(fake, tmp_path, EMO_MCP_DATABASE_URL=pg_url), cwd=tmp_path)
    with anyio.fail_after(60):
        async with Client(create_app(settings)) as client:
            detection = await detect_emo(client)
            arguments = {"image_url": PORTRAIT, "audio_url": SPEECH}
            arguments |= {k: detection[k] for k in ("face_bbox", "ext_bbox")}
            submitted = await call_ok(client, "emo_generate", arguments)
            again = await call_ok(client, "emo_generate", arguments)
            done = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 30})
    assert again["task_id"] == submitted["task_id"] and again.get("deduplicated") is True
    assert done["task_status"] == "SUCCEEDED"
    video = Path(done["video_path"])
    assert hashlib.sha256(video.read_bytes()).hexdigest() == fake.video_sha256(submitted["task_id"])
    with psycopg.connect(pg_url) as conn:
        task = conn.execute(
            "SELECT status, video_path FROM tasks WHERE task_id = %s", (submitted["task_id"],)
        ).fetchone()
        detections = conn.execute("SELECT COUNT(*) FROM detections WHERE image_url = %s", (PORTRAIT,)).fetchone()
    assert task == ("SUCCEEDED", str(video)) and detections == (1,)
    assert not (settings.state_dir / LEDGER_FILE).exists()


@needs_postgres
def test_import_sqlite_copies_an_older_ledger_once(pg_url: str, tmp_path: Path) -> None:
    source = old_ledger(tmp_path / "old")
    env = {"EMO_MCP_DATABASE_URL": pg_url, "OUTPUT_DIR": str(tmp_path / "output"), "HOME": str(tmp_path)}

    def run() -> dict[str, tuple[int, int]]:
        result = cli("db", "import-sqlite", str(source), "--json", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert "emo_test_pw" not in result.stdout + result.stderr
        return {item["table"]: (item["copied"], item["skipped"]) for item in report["tables"]}

    first = run()
    assert first == {
        "detections": (2, 0),
        "tasks": (4, 0),
        "spend_estimates": (2, 0),
        "uploads": (1, 0),
        "model_rates": (1, 0),
        "due_queue": (2, 0),
    }
    with sqlite3.connect(source) as db:  # the old server carried on: one more detection
        db.execute(
            "INSERT INTO detections (family, model, image_url, check_pass, created_at) VALUES"
            " ('emo', 'emo-detect-v1', 'https://images.example.com/new.jpg', 1, 1.5e9)"
        )
    db.close()
    second = run()
    assert second["detections"] == (1, 2) and second["tasks"] == (0, 4) and second["due_queue"] == (0, 2)
    ledger = Ledger(tmp_path, pg_url)
    try:
        done = ledger.get_task("task-done")
        assert done is not None and done.usage == {"video_duration": 5, "video_ratio": "1:1"}
        assert [d.face_bbox for d in ledger.detections_of("https://images.example.com/people/alice.jpg")] == [
            [10, 20, 110, 140]
        ]
        assert sorted(DueQueue(ledger).task_ids()) == ["task-run", "task-twin"]
        assert DueQueue(ledger).claims() == []
    finally:
        ledger.close()


def test_import_sqlite_refuses_without_a_database_url(tmp_path: Path) -> None:
    source = old_ledger(tmp_path / "old")
    env = {"OUTPUT_DIR": str(tmp_path / "output"), "HOME": str(tmp_path), "EMO_MCP_DATABASE_URL": ""}
    result = cli("db", "import-sqlite", str(source), env=env, cwd=tmp_path)
    assert result.returncode == 2 and "EMO_MCP_DATABASE_URL" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_an_unreachable_database_stops_the_server_with_one_line(tmp_path: Path, transport: str) -> None:
    url = "postgresql://emo:pw-very-secret-42@127.0.0.1:1/emo"  # a closed loopback port
    env = {"EMO_MCP_DATABASE_URL": url, "OUTPUT_DIR": str(tmp_path / "output"), "HOME": str(tmp_path)}
    started = time.monotonic()
    result = cli("--sandbox", "--transport", transport, env=env, cwd=tmp_path)
    assert time.monotonic() - started < 10
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("dashscope-emo-mcp:")]
    assert len(errors) == 1 and "EMO_MCP_DATABASE_URL=postgresql://emo:***@127.0.0.1:1/emo" in errors[0]
    assert "unreachable" in errors[0]
    assert "pw-very-secret-42" not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_stdio_start_up_on_sqlite_never_imports_psycopg(tmp_path: Path) -> None:
    """A full stdio-less session through the app on SQLite (ledger opened, a tool and a resource served)."""
    code = (
        "import sys, anyio\n"
        "from pathlib import Path\n"
        "from mcp import Client\n"
        "from server.app import create_app\n"
        "from server.config import load_settings\n"
        "async def main():\n"
        "    settings = load_settings({'OUTPUT_DIR': sys.argv[1], 'HOME': sys.argv[1]}, sandbox=True,"
        " sandbox_base_url='http://127.0.0.1:1/api/v1')\n"
        "    async with Client(create_app(settings)) as client:\n"
        "        await client.list_tools()\n"
        "        await client.read_resource('spend://today')\n"
        "anyio.run(main)\n"
        "import server.cli.main\n"
        "print(sorted(name for name in sys.modules if name.startswith('psycopg')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
