"""What the server keeps: the ledger (SQLite or PostgreSQL), the evidence folders, and the spend read from them.

`database.py` (the backend interface), `sqlite.py` and `postgres.py` (its two drivers), `migrations.py` and
`sql/<dialect>/` (versioned schema, named queries), `ledger.py` (detections, tasks), `queue.py` (the due
queue), `uploads.py` (the upload cache), `spend.py` (today's cost), `importer.py` (`db import-sqlite`),
`evidence.py` (request/response files under `OUTPUT_DIR`); the cluster's tables (migration 0003): `workers.py`
(heartbeats), `leases.py` (claims renewed, taken, released; named chores), `rates.py` (the shared rate
window), `changes.py` (a task row's version). May import `server.config`, `server.pricing`, `server.models`,
`server.errors`, `server.redaction`; never the upstream client, the jobs or anything above them.
"""
