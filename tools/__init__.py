"""The MCP tools: thin handlers over `server.domain.service`, with strict input schemas."""

from mcp.server.mcpserver.tools import Tool

from server.config import Settings
from tools import emo, emoji, tasks


def build_tools(settings: Settings) -> list[Tool]:
    return [*emo.build(settings), *emoji.build(settings), *tasks.build()]
