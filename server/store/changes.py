"""A task row's version, for waiters in one process to see what another process recorded.

Every write of a task sets its `updated_at`, so the newest `updated_at` of the rows a task id (or a
submit's local id) names changes whenever anything about the task does, on any worker. The polling
change feed (server/jobs/changes.py) reads it every half second while someone waits; it is one
indexed probe (the primary key and the local-id index), whatever the history holds.

On PostgreSQL the same wake-up comes from `LISTEN/NOTIFY`: the ledger's task writes (`update_task`,
`resolve_submit`, `merge_submit`, `delete_task`) issue `NOTIFY emo_task_changed, '<task id>'` (or a
trigger on `tasks` does), and a listening feed wakes its waiters at once; this read stays as the
check after a wake-up and as the fallback when the listening connection is lost.
"""

from __future__ import annotations

from server.store.ledger import Ledger


def task_version(ledger: Ledger, task_id: str) -> float | None:
    """The newest `updated_at` of the task's rows; None when it has none (a refused submit was deleted)."""
    rows = ledger.query("SELECT MAX(updated_at) FROM tasks WHERE task_id = ? OR local_id = ?", (task_id, task_id))
    value = rows[0][0] if rows else None
    return None if value is None else float(value)
