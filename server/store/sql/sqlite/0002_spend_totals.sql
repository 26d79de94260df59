-- Spend's running totals (server/store/spend.py): a few rows per day, moved by triggers in the very
-- transaction that changes a task, an estimate or a detection. Built from scratch (dropped first): the
-- totals are derived data, so a ledger that a build between the two releases already gave them is
-- summed again from its rows rather than trusted.
DROP TRIGGER IF EXISTS spend_task_added;
DROP TRIGGER IF EXISTS spend_task_removed;
DROP TRIGGER IF EXISTS spend_task_changed;
DROP TRIGGER IF EXISTS spend_estimate_added;
DROP TRIGGER IF EXISTS spend_estimate_changed;
DROP TRIGGER IF EXISTS spend_estimate_removed;
DROP TRIGGER IF EXISTS spend_detection_added;
DROP TRIGGER IF EXISTS spend_detection_removed;
DROP TABLE IF EXISTS spend_totals;
DROP TABLE IF EXISTS spend_detections;
CREATE TABLE spend_totals (
    day TEXT NOT NULL,
    family TEXT NOT NULL,
    kind TEXT NOT NULL,
    ratio TEXT NOT NULL,
    n INTEGER NOT NULL,
    estimated REAL NOT NULL,
    seconds REAL NOT NULL,
    PRIMARY KEY (day, family, kind, ratio)
);
CREATE TABLE spend_detections (
    day TEXT NOT NULL,
    family TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (day, family)
);
INSERT INTO spend_totals (day, family, kind, ratio, n, estimated, seconds)
    SELECT date(t.created_at, 'unixepoch', 'localtime'), t.family, CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real') THEN 'billed' WHEN t.status IN ('CANCELED','FAILED','NOT_FOUND','UNKNOWN') THEN 'dead' ELSE 'open' END, CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real') THEN COALESCE(json_extract(t.usage, '$.video_ratio'), '') ELSE '' END, COUNT(*), SUM(COALESCE(e.estimated_cny, 0)),
        SUM(CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real') THEN json_extract(t.usage, '$.video_duration') ELSE 0 END)
    FROM tasks t LEFT JOIN spend_estimates e ON e.task_id = t.task_id GROUP BY 1, 2, 3, 4;
INSERT INTO spend_detections (day, family, n)
    SELECT date(d.created_at, 'unixepoch', 'localtime'), d.family, COUNT(*) FROM detections d GROUP BY 1, 2;
CREATE TRIGGER spend_task_added AFTER INSERT ON tasks BEGIN
    INSERT INTO spend_totals (day, family, kind, ratio, n, estimated, seconds) VALUES (date(NEW.created_at, 'unixepoch', 'localtime'), NEW.family, CASE WHEN json_type(NEW.usage, '$.video_duration') IN ('integer', 'real') THEN 'billed' WHEN NEW.status IN ('CANCELED','FAILED','NOT_FOUND','UNKNOWN') THEN 'dead' ELSE 'open' END, CASE WHEN json_type(NEW.usage, '$.video_duration') IN ('integer', 'real') THEN COALESCE(json_extract(NEW.usage, '$.video_ratio'), '') ELSE '' END, +1, +COALESCE((SELECT estimated_cny FROM spend_estimates WHERE task_id = NEW.task_id), 0), +(CASE WHEN json_type(NEW.usage, '$.video_duration') IN ('integer', 'real') THEN json_extract(NEW.usage, '$.video_duration') ELSE 0 END)) ON CONFLICT (day, family, kind, ratio) DO UPDATE SET n = n + excluded.n, estimated = estimated + excluded.estimated, seconds = seconds + excluded.seconds;
END;
CREATE TRIGGER spend_task_removed AFTER DELETE ON tasks BEGIN
    INSERT INTO spend_totals (day, family, kind, ratio, n, estimated, seconds) VALUES (date(OLD.created_at, 'unixepoch', 'localtime'), OLD.family, CASE WHEN json_type(OLD.usage, '$.video_duration') IN ('integer', 'real') THEN 'billed' WHEN OLD.status IN ('CANCELED','FAILED','NOT_FOUND','UNKNOWN') THEN 'dead' ELSE 'open' END, CASE WHEN json_type(OLD.usage, '$.video_duration') IN ('integer', 'real') THEN COALESCE(json_extract(OLD.usage, '$.video_ratio'), '') ELSE '' END, -1, -COALESCE((SELECT estimated_cny FROM spend_estimates WHERE task_id = OLD.task_id), 0), -(CASE WHEN json_type(OLD.usage, '$.video_duration') IN ('integer', 'real') THEN json_extract(OLD.usage, '$.video_duration') ELSE 0 END)) ON CONFLICT (day, family, kind, ratio) DO UPDATE SET n = n + excluded.n, estimated = estimated + excluded.estimated, seconds = seconds + excluded.seconds;
END;
CREATE TRIGGER spend_task_changed AFTER UPDATE OF task_id, family, status, usage, created_at ON tasks
WHEN OLD.task_id IS NOT NEW.task_id OR OLD.family IS NOT NEW.family OR OLD.status IS NOT NEW.status
    OR OLD.usage IS NOT NEW.usage OR OLD.created_at IS NOT NEW.created_at BEGIN
    INSERT INTO spend_totals (day, family, kind, ratio, n, estimated, seconds) VALUES (date(OLD.created_at, 'unixepoch', 'localtime'), OLD.family, CASE WHEN json_type(OLD.usage, '$.video_duration') IN ('integer', 'real') THEN 'billed' WHEN OLD.status IN ('CANCELED','FAILED','NOT_FOUND','UNKNOWN') THEN 'dead' ELSE 'open' END, CASE WHEN json_type(OLD.usage, '$.video_duration') IN ('integer', 'real') THEN COALESCE(json_extract(OLD.usage, '$.video_ratio'), '') ELSE '' END, -1, -COALESCE((SELECT estimated_cny FROM spend_estimates WHERE task_id = OLD.task_id), 0), -(CASE WHEN json_type(OLD.usage, '$.video_duration') IN ('integer', 'real') THEN json_extract(OLD.usage, '$.video_duration') ELSE 0 END)) ON CONFLICT (day, family, kind, ratio) DO UPDATE SET n = n + excluded.n, estimated = estimated + excluded.estimated, seconds = seconds + excluded.seconds;
    INSERT INTO spend_totals (day, family, kind, ratio, n, estimated, seconds) VALUES (date(NEW.created_at, 'unixepoch', 'localtime'), NEW.family, CASE WHEN json_type(NEW.usage, '$.video_duration') IN ('integer', 'real') THEN 'billed' WHEN NEW.status IN ('CANCELED','FAILED','NOT_FOUND','UNKNOWN') THEN 'dead' ELSE 'open' END, CASE WHEN json_type(NEW.usage, '$.video_duration') IN ('integer', 'real') THEN COALESCE(json_extract(NEW.usage, '$.video_ratio'), '') ELSE '' END, +1, +COALESCE((SELECT estimated_cny FROM spend_estimates WHERE task_id = NEW.task_id), 0), +(CASE WHEN json_type(NEW.usage, '$.video_duration') IN ('integer', 'real') THEN json_extract(NEW.usage, '$.video_duration') ELSE 0 END)) ON CONFLICT (day, family, kind, ratio) DO UPDATE SET n = n + excluded.n, estimated = estimated + excluded.estimated, seconds = seconds + excluded.seconds;
END;
CREATE TRIGGER spend_estimate_added AFTER INSERT ON spend_estimates BEGIN
    UPDATE spend_totals SET estimated = estimated + NEW.estimated_cny WHERE (day, family, kind, ratio) IN (SELECT date(t.created_at, 'unixepoch', 'localtime'), t.family, CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real') THEN 'billed' WHEN t.status IN ('CANCELED','FAILED','NOT_FOUND','UNKNOWN') THEN 'dead' ELSE 'open' END, CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real') THEN COALESCE(json_extract(t.usage, '$.video_ratio'), '') ELSE '' END FROM tasks t WHERE t.task_id = NEW.task_id);
END;
CREATE TRIGGER spend_estimate_changed AFTER UPDATE OF estimated_cny, task_id ON spend_estimates BEGIN
    UPDATE spend_totals SET estimated = estimated - OLD.estimated_cny WHERE (day, family, kind, ratio) IN (SELECT date(t.created_at, 'unixepoch', 'localtime'), t.family, CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real') THEN 'billed' WHEN t.status IN ('CANCELED','FAILED','NOT_FOUND','UNKNOWN') THEN 'dead' ELSE 'open' END, CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real') THEN COALESCE(json_extract(t.usage, '$.video_ratio'), '') ELSE '' END FROM tasks t WHERE t.task_id = OLD.task_id);
    UPDATE spend_totals SET estimated = estimated + NEW.estimated_cny WHERE (day, family, kind, ratio) IN (SELECT date(t.created_at, 'unixepoch', 'localtime'), t.family, CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real') THEN 'billed' WHEN t.status IN ('CANCELED','FAILED','NOT_FOUND','UNKNOWN') THEN 'dead' ELSE 'open' END, CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real') THEN COALESCE(json_extract(t.usage, '$.video_ratio'), '') ELSE '' END FROM tasks t WHERE t.task_id = NEW.task_id);
END;
CREATE TRIGGER spend_estimate_removed AFTER DELETE ON spend_estimates BEGIN
    UPDATE spend_totals SET estimated = estimated - OLD.estimated_cny WHERE (day, family, kind, ratio) IN (SELECT date(t.created_at, 'unixepoch', 'localtime'), t.family, CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real') THEN 'billed' WHEN t.status IN ('CANCELED','FAILED','NOT_FOUND','UNKNOWN') THEN 'dead' ELSE 'open' END, CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real') THEN COALESCE(json_extract(t.usage, '$.video_ratio'), '') ELSE '' END FROM tasks t WHERE t.task_id = OLD.task_id);
END;
CREATE TRIGGER spend_detection_added AFTER INSERT ON detections BEGIN
    INSERT INTO spend_detections (day, family, n) VALUES (date(NEW.created_at, 'unixepoch', 'localtime'), NEW.family, 1)
    ON CONFLICT (day, family) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER spend_detection_removed AFTER DELETE ON detections BEGIN
    UPDATE spend_detections SET n = n - 1 WHERE day = date(OLD.created_at, 'unixepoch', 'localtime') AND family = OLD.family;
END;
