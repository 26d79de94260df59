"""The floor under any stdio MCP server: a process that answers each JSON-RPC request line at once.

No SDK, no validation: it reads a line, parses it and writes a fixed tool result with the same id.
Timing it against the SDK's no-op server (`bench.minimal_server --dispatch`) shows what the SDK's
dispatch costs; timing it against nothing shows what two processes and a pipe each way cost.
"""

from __future__ import annotations

import json
import sys

RESULT = {"content": [{"type": "text", "text": "{}"}], "structuredContent": {}, "isError": False}


def main() -> None:
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        message = json.loads(line)
        if "id" in message:
            out.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": RESULT}).encode() + b"\n")
            out.flush()


if __name__ == "__main__":
    main()
