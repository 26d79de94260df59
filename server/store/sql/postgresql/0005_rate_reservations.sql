-- The cluster's rate window as one row per limiter key (server/store/rates.py): `tat` is the earliest
-- moment (the ledger's clock) the next start may have, so a worker reserves its next few starts with one
-- upsert instead of counting the last window's starts in `rate_slots` on every start. `granted` is the
-- first slot of the last reservation (-1: none was granted, the timeline was too far ahead).
ALTER TABLE rate_limits ADD COLUMN IF NOT EXISTS tat DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE rate_limits ADD COLUMN IF NOT EXISTS granted DOUBLE PRECISION NOT NULL DEFAULT 0;
DROP TABLE IF EXISTS rate_slots;

-- A task row whose only change is its query count (`polls`, `updated_at`: every answer about an open
-- task that says what the last one said) wakes nobody: waiters re-read the row and would find nothing
-- new, and with many open tasks every worker's listening thread would wake on every query of the
-- cluster. Every other change (status, times, video, errors, a new or deleted row) notifies as before.
CREATE OR REPLACE FUNCTION emo_task_changed() RETURNS trigger AS $$
DECLARE
    row_ tasks%ROWTYPE;
    before_ tasks%ROWTYPE;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_ := OLD;
    ELSE
        row_ := NEW;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        before_ := OLD;
        before_.polls := NEW.polls;
        before_.updated_at := NEW.updated_at;
        IF before_ IS NOT DISTINCT FROM NEW THEN
            RETURN NULL;
        END IF;
    END IF;
    PERFORM pg_notify('emo_task_changed', TG_TABLE_SCHEMA || ' ' || row_.task_id);
    IF row_.local_id IS NOT NULL AND row_.local_id <> row_.task_id THEN
        PERFORM pg_notify('emo_task_changed', TG_TABLE_SCHEMA || ' ' || row_.local_id);
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.task_id <> NEW.task_id THEN
        PERFORM pg_notify('emo_task_changed', TG_TABLE_SCHEMA || ' ' || OLD.task_id);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
