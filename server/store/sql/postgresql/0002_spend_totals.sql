-- Spend's running totals (server/store/spend.py): a few rows per day, moved by triggers in the very
-- transaction that changes a task, an estimate or a detection, so no writer (submit, reconciliation,
-- merge, import) can forget them. The same buckets as SQLite's: (day, family, kind, ratio), kind being
-- 'billed' (upstream reported a duration), 'dead' (never billed) or 'open' (its estimate counts).
-- The day is the writer's local calendar day: each connection's TimeZone is set to the process's
-- (server/store/postgres.py), as SQLite's 'localtime' is.
CREATE TABLE spend_totals (
    day TEXT NOT NULL,
    family TEXT NOT NULL,
    kind TEXT NOT NULL,
    ratio TEXT NOT NULL,
    n BIGINT NOT NULL,
    estimated DOUBLE PRECISION NOT NULL,
    seconds DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (day, family, kind, ratio)
);
CREATE TABLE spend_detections (
    day TEXT NOT NULL,
    family TEXT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (day, family)
);

CREATE FUNCTION emo_spend_day(created_at DOUBLE PRECISION) RETURNS TEXT LANGUAGE sql STABLE AS $$
    SELECT to_char(to_timestamp(created_at), 'YYYY-MM-DD')
$$;
CREATE FUNCTION emo_spend_billed(usage TEXT) RETURNS BOOLEAN LANGUAGE sql IMMUTABLE AS $$
    SELECT COALESCE(jsonb_typeof(usage::jsonb -> 'video_duration') = 'number', false)
$$;
CREATE FUNCTION emo_spend_kind(usage TEXT, status TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN emo_spend_billed(usage) THEN 'billed'
        WHEN status IN ('CANCELED', 'FAILED', 'NOT_FOUND', 'UNKNOWN') THEN 'dead' ELSE 'open' END
$$;
CREATE FUNCTION emo_spend_ratio(usage TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN emo_spend_billed(usage) THEN COALESCE(usage::jsonb ->> 'video_ratio', '') ELSE '' END
$$;
CREATE FUNCTION emo_spend_seconds(usage TEXT) RETURNS DOUBLE PRECISION LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN emo_spend_billed(usage) THEN (usage::jsonb ->> 'video_duration')::DOUBLE PRECISION ELSE 0 END
$$;

-- Add (sign 1) or take away (-1) one task's contribution to its bucket.
CREATE FUNCTION emo_spend_move(t tasks, sign INTEGER) RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO spend_totals AS s (day, family, kind, ratio, n, estimated, seconds)
    VALUES (emo_spend_day(t.created_at), t.family, emo_spend_kind(t.usage, t.status), emo_spend_ratio(t.usage), sign,
        sign * COALESCE((SELECT e.estimated_cny FROM spend_estimates e WHERE e.task_id = t.task_id), 0),
        sign * emo_spend_seconds(t.usage))
    ON CONFLICT (day, family, kind, ratio) DO UPDATE SET n = s.n + excluded.n,
        estimated = s.estimated + excluded.estimated, seconds = s.seconds + excluded.seconds;
END $$;

-- Move the estimate of a task that already sits in a bucket (the estimate comes after the row).
CREATE FUNCTION emo_spend_estimate_move(task TEXT, amount DOUBLE PRECISION) RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    UPDATE spend_totals s SET estimated = s.estimated + amount
    FROM tasks t WHERE t.task_id = task AND s.day = emo_spend_day(t.created_at) AND s.family = t.family
        AND s.kind = emo_spend_kind(t.usage, t.status) AND s.ratio = emo_spend_ratio(t.usage);
END $$;

CREATE FUNCTION emo_spend_task_trigger() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM emo_spend_move(OLD, -1);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        PERFORM emo_spend_move(NEW, 1);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION emo_spend_estimate_trigger() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM emo_spend_estimate_move(OLD.task_id, -OLD.estimated_cny);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        PERFORM emo_spend_estimate_move(NEW.task_id, NEW.estimated_cny);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION emo_spend_detection_trigger() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO spend_detections AS s (day, family, n) VALUES (emo_spend_day(NEW.created_at), NEW.family, 1)
        ON CONFLICT (day, family) DO UPDATE SET n = s.n + 1;
    ELSE
        UPDATE spend_detections SET n = n - 1 WHERE day = emo_spend_day(OLD.created_at) AND family = OLD.family;
    END IF;
    RETURN NULL;
END $$;

-- What the ledger already holds, summed once.
INSERT INTO spend_totals (day, family, kind, ratio, n, estimated, seconds)
    SELECT emo_spend_day(t.created_at), t.family, emo_spend_kind(t.usage, t.status), emo_spend_ratio(t.usage),
        COUNT(*), SUM(COALESCE(e.estimated_cny, 0)), SUM(emo_spend_seconds(t.usage))
    FROM tasks t LEFT JOIN spend_estimates e ON e.task_id = t.task_id GROUP BY 1, 2, 3, 4;
INSERT INTO spend_detections (day, family, n)
    SELECT emo_spend_day(d.created_at), d.family, COUNT(*) FROM detections d GROUP BY 1, 2;

CREATE TRIGGER spend_task_added AFTER INSERT OR DELETE ON tasks
    FOR EACH ROW EXECUTE FUNCTION emo_spend_task_trigger();
-- Only when a column the totals depend on really changed: most polls change nothing of these.
CREATE TRIGGER spend_task_changed AFTER UPDATE OF task_id, family, status, usage, created_at ON tasks
    FOR EACH ROW WHEN (OLD.task_id IS DISTINCT FROM NEW.task_id OR OLD.family IS DISTINCT FROM NEW.family
        OR OLD.status IS DISTINCT FROM NEW.status OR OLD.usage IS DISTINCT FROM NEW.usage
        OR OLD.created_at IS DISTINCT FROM NEW.created_at)
    EXECUTE FUNCTION emo_spend_task_trigger();
CREATE TRIGGER spend_estimate_moved AFTER INSERT OR DELETE OR UPDATE OF estimated_cny, task_id ON spend_estimates
    FOR EACH ROW EXECUTE FUNCTION emo_spend_estimate_trigger();
CREATE TRIGGER spend_detection_moved AFTER INSERT OR DELETE ON detections
    FOR EACH ROW EXECUTE FUNCTION emo_spend_detection_trigger();
