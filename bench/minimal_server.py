"""The baseline server: the same MCP SDK, one tool, nothing else.

`python -m bench.minimal_server` serves one `echo` tool (the cold-start baseline).
`python -m bench.minimal_server --proxy BASE_URL --api-key KEY` serves one `emo_detect` tool that
forwards the call to DashScope (or the fake) with a shared `httpx2.AsyncClient` and returns the
answer: the floor any MCP server on this SDK pays per call, to tell SDK cost from ours.
`python -m bench.minimal_server --dispatch` serves an async `emo_detect` that does nothing, over this
project's stdio transport (`server/transport/stdio.py`): what the SDK's JSON-RPC dispatch alone costs a call.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

import anyio
import httpx2
from mcp.server.mcpserver import MCPServer


def _echo_server() -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer(name="minimal")

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    return server


def _proxy_server(base_url: str, api_key: str) -> MCPServer[Any]:
    http = httpx2.AsyncClient(timeout=30.0)
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    url = base_url.rstrip("/") + "/services/aigc/image2video/face-detect"
    server: MCPServer[Any] = MCPServer(name="minimal-proxy")

    @server.tool()
    async def emo_detect(image_url: str, ratio: str = "1:1") -> dict[str, Any]:
        """Forward a detection to the upstream and return its JSON answer."""
        payload = {"model": "emo-detect-v1", "input": {"image_url": image_url}, "parameters": {"ratio": ratio}}
        response = await http.post(url, json=payload, headers=headers)
        answer: dict[str, Any] = response.json()
        return answer

    return server


def _noop_server() -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer(name="minimal-dispatch")

    @server.tool()
    async def emo_detect(image_url: str, ratio: str = "1:1") -> dict[str, Any]:
        """Answer at once without calling anything (the SDK's dispatch cost alone)."""
        return {"check_pass": True, "ratio": ratio}

    return server


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proxy", metavar="BASE_URL", help="serve a forwarding emo_detect instead of echo")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--dispatch", action="store_true", help="serve a no-op emo_detect on our stdio pipes")
    args = parser.parse_args(argv)
    if args.dispatch:
        from server.transport.stdio import serve_stdio

        anyio.run(serve_stdio, _noop_server())
        return
    server = _proxy_server(args.proxy, args.api_key) if args.proxy else _echo_server()
    # The project's server keeps httpx2's per-request INFO line out of its logs; so does the floor.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    server.run()


if __name__ == "__main__":
    main()
