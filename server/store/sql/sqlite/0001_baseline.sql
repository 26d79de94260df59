-- The ledger as the first versioned release holds it. Written with IF NOT EXISTS because a file from
-- before versioning is adopted by this same migration (server/store/sqlite.py first adds the columns
-- such a file may lack), so every ledger at version 1 has exactly this shape.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS detections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    family TEXT NOT NULL,
    model TEXT NOT NULL,
    image_url TEXT NOT NULL,
    ratio TEXT,
    check_pass INTEGER NOT NULL,
    face_bbox TEXT,
    ext_bbox TEXT,
    code TEXT,
    message TEXT,
    request_id TEXT,
    evidence_dir TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS detections_by_image ON detections (family, image_url);
CREATE INDEX IF NOT EXISTS detections_by_url ON detections (image_url);
CREATE INDEX IF NOT EXISTS detections_by_created ON detections (created_at);
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    family TEXT NOT NULL,
    model TEXT NOT NULL,
    payload TEXT NOT NULL,
    ratio TEXT,
    status TEXT NOT NULL,
    submit_time TEXT,
    scheduled_time TEXT,
    end_time TEXT,
    video_url TEXT,
    video_path TEXT,
    video_sha256 TEXT,
    video_bytes INTEGER,
    usage TEXT,
    code TEXT,
    message TEXT,
    request_id TEXT,
    evidence_dir TEXT NOT NULL,
    polls INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    fingerprint TEXT,
    local_id TEXT,
    owner TEXT,
    dedupe_key TEXT
);
CREATE INDEX IF NOT EXISTS tasks_by_fingerprint ON tasks (fingerprint);
CREATE INDEX IF NOT EXISTS tasks_by_local_id ON tasks (local_id);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status);
CREATE INDEX IF NOT EXISTS tasks_by_created ON tasks (created_at);
-- Dedupe by constraint: at most one usable task per submit fingerprint (dedupe_key is the fingerprint
-- of a submit that asked to be deduplicated). The predicate is the ledger's "still usable" rule.
CREATE UNIQUE INDEX IF NOT EXISTS tasks_one_live_per_fingerprint ON tasks (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status NOT IN ('CANCELED', 'FAILED', 'NOT_FOUND', 'UNKNOWN')
    AND NOT (status = 'SUCCEEDED' AND COALESCE(code, '') = 'VideoExpired');
CREATE TABLE IF NOT EXISTS due_queue (
    task_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    created_at REAL NOT NULL,
    stage TEXT NOT NULL,
    due_at REAL NOT NULL,
    expected_seconds REAL,
    expected_start REAL,
    expected_end REAL,
    basis TEXT,
    claimed_by TEXT
);
CREATE INDEX IF NOT EXISTS due_queue_by_due ON due_queue (due_at);
CREATE INDEX IF NOT EXISTS due_queue_by_model ON due_queue (model, stage, created_at);
CREATE TABLE IF NOT EXISTS model_rates (
    model TEXT PRIMARY KEY,
    finished INTEGER NOT NULL,
    output_seconds REAL NOT NULL,
    run_seconds REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS due_queue_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spend_estimates (
    task_id TEXT PRIMARY KEY,
    family TEXT NOT NULL,
    estimated_cny REAL NOT NULL,
    basis TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    sha256 TEXT NOT NULL,
    model TEXT NOT NULL,
    oss_url TEXT NOT NULL,
    local_path TEXT,
    uploaded_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (sha256, model)
);
