-- Queries SQLite and PostgreSQL spell differently (server/store/migrations.py reads them by name).
-- The parameters are the same, in the same order, in both dialects' file.

-- name: claim
-- Up to LIMIT due tasks, earliest first, pushed a lease ahead. SQLite has one writer at a time, so
-- the UPDATE itself is the lock. (now, limit, lease_until, owner)
-- Returns (task_id, previous claimer, the due time it was claimed at): a previous claimer other than
-- the owner is a takeover of a claim whose lease ran out (counted by emo_mcp_leases_taken_over); the due
-- time anchors the task's next one (Watcher._file_next), so its queries keep their cadence.
-- MATERIALIZED: `picked` is read once, before the update, so RETURNING sees the previous row.
WITH picked AS MATERIALIZED (SELECT task_id, claimed_by AS previous, due_at AS was_due FROM due_queue
    WHERE due_at <= ? ORDER BY due_at LIMIT ?)
UPDATE due_queue SET due_at = ?, claimed_by = ? WHERE task_id IN (SELECT task_id FROM picked)
    RETURNING task_id, (SELECT previous FROM picked WHERE picked.task_id = due_queue.task_id),
    (SELECT was_due FROM picked WHERE picked.task_id = due_queue.task_id);

-- name: schedule
-- Queue a task, or move it earlier (never later): (task_id, model, created_at, stage, due_at).
-- A claimed row (a step in flight on some worker) keeps its lease as its due time: its step files the next.
INSERT INTO due_queue (task_id, model, created_at, stage, due_at) VALUES (?,?,?,?,?)
    ON CONFLICT (task_id) DO UPDATE SET
    due_at = CASE WHEN due_queue.claimed_by IS NULL AND excluded.due_at < due_queue.due_at
        THEN excluded.due_at ELSE due_queue.due_at END,
    stage = CASE WHEN due_queue.claimed_by IS NULL THEN excluded.stage ELSE due_queue.stage END;
