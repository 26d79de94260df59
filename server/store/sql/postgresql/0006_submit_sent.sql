-- When a submit's request was about to leave (epoch seconds): 0 while it has not, NULL for a row written
-- by a version that did not record it. A SUBMITTING row whose worker died with 0 here was never sent, so
-- nothing can exist upstream: it is withdrawn at once (server/jobs/reconcile.py) instead of blocking an
-- identical generate for EMO_MCP_RECONCILE_WINDOW. Rows in flight now are treated as sent.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS sent_at DOUBLE PRECISION;
UPDATE tasks SET sent_at = created_at WHERE status = 'SUBMITTING' AND sent_at IS NULL;
