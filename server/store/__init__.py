"""What the server keeps: the SQLite ledger, the evidence folders, and the spend read from them.

`ledger.py` (detections, tasks, their schema), `evidence.py` (request/response files under
`OUTPUT_DIR`), `spend.py` (today's cost from the ledger). The PostgreSQL backend will live here.
May import `server.config`, `server.pricing`, `server.models`, `server.errors`; never the
upstream client, the jobs or anything above them.
"""
