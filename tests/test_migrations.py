"""Ledgers written before versioned migrations open with today's code, in place, keeping every row.

The fixture was written by the release before (tests/fixtures/README.md). Older files still, from
before the `_ADDED_COLUMNS` of that release, lack the submit columns: they are adopted the same way.
Several processes opening one new or old file at once migrate it once.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from server.store.ledger import LEDGER_FILE, Ledger
from server.store.migrations import latest
from server.store.queue import DueQueue
from server.store.spend import estimate_of
from server.store.uploads import UploadCache

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "ledger-before-migrations.sql"


def old_ledger(folder: Path, *, drop_submit_columns: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LEDGER_FILE
    with sqlite3.connect(path) as db:
        db.executescript(FIXTURE.read_text(encoding="utf-8"))
        if drop_submit_columns:  # as the first release wrote it, before fingerprint/local_id/owner
            db.executescript(
                "DROP INDEX tasks_by_fingerprint; DROP INDEX tasks_by_local_id;"
                " ALTER TABLE tasks DROP COLUMN fingerprint; ALTER TABLE tasks DROP COLUMN local_id;"
                " ALTER TABLE tasks DROP COLUMN owner;"
            )
    db.close()
    return path


def test_a_ledger_from_before_migrations_is_migrated_in_place(tmp_path: Path) -> None:
    old_ledger(tmp_path)
    ledger = Ledger(tmp_path)
    try:
        assert ledger.version() == latest("sqlite")
        assert [d.check_pass for d in ledger.detections_of("https://images.example.com/people/alice.jpg")] == [True]
        done = ledger.get_task("task-done")
        assert done is not None and done.video_path == "/old/output/task-done.mp4" and done.usage is not None
        assert {t.task_id for t in ledger.tasks()} == {"task-done", "task-run", "task-twin", "task-fail"}
        queue = DueQueue(ledger)
        assert sorted(queue.task_ids()) == ["task-run", "task-twin"] and queue.rate("emo-v1").finished == 1
        assert estimate_of(ledger, "task-run") == 0.8
        assert UploadCache(ledger).fresh("abc123", "emo-v1", 0.0) == "oss://dashscope-instant/x/a.png"
        # The two usable twins (sent with allow_duplicate) are kept; the newest holds the dedupe key.
        keyed = ledger.query("SELECT task_id FROM tasks WHERE dedupe_key IS NOT NULL ORDER BY task_id")
        assert [row[0] for row in keyed] == ["task-done", "task-twin"]
        reused = ledger.begin_submit(
            local_id="submit-new",
            family="emo",
            model="emo-v1",
            payload={},
            ratio="1:1",
            fingerprint="fp-alice",
            evidence_dir="/e",
            owner="h:1",
            allow_duplicate=False,
        )
        assert reused is not None and reused.task_id == "task-twin"
    finally:
        ledger.close()
    again = Ledger(tmp_path)  # a second open finds nothing to do
    assert again.version() == latest("sqlite")
    assert len(again.query("SELECT * FROM schema_migrations")) == latest("sqlite")
    again.close()


def test_a_ledger_from_the_first_release_gains_the_submit_columns(tmp_path: Path) -> None:
    old_ledger(tmp_path, drop_submit_columns=True)
    ledger = Ledger(tmp_path)
    try:
        columns = {row["name"] for row in ledger.query("PRAGMA table_info(tasks)")}
        assert {"fingerprint", "local_id", "owner", "dedupe_key"} <= columns
        record = ledger.get_task("task-run")
        assert record is not None and record.fingerprint is None and record.status == "RUNNING"
    finally:
        ledger.close()


OPEN = (
    "import sys; from pathlib import Path; from server.store.ledger import Ledger;"
    " print(Ledger(Path(sys.argv[1]), *sys.argv[2:]).version())"
)


def test_processes_opening_one_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    fresh.mkdir()
    old_ledger(old)
    for folder in (fresh, old):
        children = [
            subprocess.Popen([sys.executable, "-c", OPEN, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for _ in range(6)
        ]
        versions = [child.communicate(timeout=60)[0].strip() for child in children]
        assert all(child.returncode == 0 for child in children)
        assert versions == [str(latest("sqlite"))] * 6
        with sqlite3.connect(folder / LEDGER_FILE) as db:
            assert db.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == latest("sqlite")
        db.close()
