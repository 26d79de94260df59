-- The cluster (issue 14): workers with heartbeats, leases on named chores, the shared rate window,
-- and an index for the claims of one worker (server/store/workers.py, leases.py, rates.py).
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS workers_by_heartbeat ON workers (heartbeat_at);
CREATE TABLE IF NOT EXISTS cluster_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS rate_limits (
    key TEXT PRIMARY KEY,
    paused_until DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS rate_slots (
    key TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS rate_slots_by_key ON rate_slots (key, at);
CREATE INDEX IF NOT EXISTS due_queue_by_claimer ON due_queue (claimed_by);
