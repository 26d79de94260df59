"""The life of a paid task after it is asked for: submit once, follow it, download it, recover it.

`submits.py` (one submit per request, never billed twice), `watcher.py` (the background poller and
downloader), `reconcile.py` (finding tasks whose submit answer was lost), `tasks.py` (answers to
`task_status`), `task_views.py` (ledger rows shaped for resources), `workers.py` (this process as a worker of
the cluster: id, heartbeat, liveness), `changes.py` (the change feed waiters wake on). May import
`server.upstream`, `server.store`, `server.media` and the base modules; never the domain above.
"""
