"""A cluster worker for the benches: `python -m server`, with `EMO_MCP_MODEL_QPS` honoured everywhere.

Why: the cluster figures raise the per-model detect and submit limits (the fake enforces none of its
own, so the server's limiter would otherwise be what a throughput figure measures). A server build
that reads `EMO_MCP_MODEL_QPS` itself (server/config.py's `MODEL_QPS_ENV`) gets nothing changed here;
on a build from before that variable, its `name=rate` pairs replace the contract's figures in
`server.upstream.limits.MODEL_RATES` for this process, which is what the variable does. bench/cluster.py
says in its output which of the two applied.
"""

from __future__ import annotations

import os

import server.config
from server.upstream import limits

MODEL_QPS = "EMO_MCP_MODEL_QPS"


def reads_model_qps() -> bool:
    """Whether this server build reads EMO_MCP_MODEL_QPS itself."""
    return hasattr(server.config, "MODEL_QPS_ENV")


def apply_model_qps(raw: str) -> dict[str, float]:
    """`emo-detect-v1=1000,emo-v1=1000` into the limiter's table (older builds only)."""
    rates: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, _, value = item.partition("=")
        rates[name.strip()] = float(value)
    limits.MODEL_RATES.update(rates)
    return rates


if __name__ == "__main__":
    if not reads_model_qps():
        apply_model_qps(os.environ.get(MODEL_QPS, ""))
    from server.cli.main import main

    raise SystemExit(main())
