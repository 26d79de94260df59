"""The DashScope HTTP API, and nothing else: requests, retries, rate limits, streamed downloads.

Holds the client (`client.py`), how its answers are read and doubted (`answers.py`: bounded
bodies, no redirects, failures sorted into not sent / no answer / unreadable), the per-process
limits it waits on (`limits.py`) and the download pipeline (`streaming.py`). It knows no ledger,
no evidence folder and no MCP: it may import only `server.errors`, `server.models` and
`server.media.addresses` (the private-address guard each redirect hop of a download passes), so
every layer above can use it and it can be tested alone.
"""
