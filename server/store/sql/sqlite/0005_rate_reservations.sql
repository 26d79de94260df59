-- The cluster's rate window as one row per limiter key (server/store/rates.py): `tat` is the earliest
-- moment (the ledger's clock) the next start may have, so a worker reserves its next few starts with one
-- upsert instead of counting the last window's starts in `rate_slots` on every start. `granted` is the
-- first slot of the last reservation (-1: none was granted, the timeline was too far ahead).
-- The table only holds the current windows and pauses (seconds of state): it is made anew rather than
-- altered, so that this file can be replayed (a ledger from before versioning replays every migration).
DROP TABLE IF EXISTS rate_slots;
DROP TABLE IF EXISTS rate_limits;
CREATE TABLE rate_limits (
    key TEXT PRIMARY KEY,
    paused_until REAL NOT NULL,
    tat REAL NOT NULL DEFAULT 0,
    granted REAL NOT NULL DEFAULT 0
);
