"""The DashScope HTTP API, and nothing else: requests, retries, rate limits, streamed downloads.

Holds the client (`client.py`), the per-process limits it waits on (`limits.py`) and the download
pipeline (`streaming.py`). It knows no ledger, no evidence folder and no MCP: it may import only
`server.errors` and `server.models`, so every layer above can use it and it can be tested alone.
"""
