-- Waiters on any worker wake when a task row changes (issue 14): every insert, update or delete of a
-- `tasks` row sends `NOTIFY emo_task_changed` with the task id (and, for a submit's row, its local id
-- too), delivered at commit to every session that LISTENs (server/jobs/changes.py, ListeningFeed). A
-- trigger rather than a NOTIFY in each writer: no write path (the ledger's, reconciliation's, the
-- importer's) can forget it. The channel is per database; the payload names the schema as well, so
-- ledgers in separate schemas of one database do not wake each other's waiters.
CREATE OR REPLACE FUNCTION emo_task_changed() RETURNS trigger AS $$
DECLARE
    row_ tasks%ROWTYPE;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_ := OLD;
    ELSE
        row_ := NEW;
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
DROP TRIGGER IF EXISTS tasks_notify_change ON tasks;
CREATE TRIGGER tasks_notify_change AFTER INSERT OR UPDATE OR DELETE ON tasks
    FOR EACH ROW EXECUTE FUNCTION emo_task_changed();
