"""The MCP application factory. Nothing happens at import time; `create_app` wires it all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import httpx2
from mcp.server.mcpserver import MCPServer

from server.config import Settings
from server.runtime import open_service
from server.viewer.extension import install_viewer, viewer_extension
from tools import build_tools
from tools.context import AppContext
from tools.prompts import register_prompts
from tools.resources import register_resources, register_spend_resource

INSTRUCTIONS = """Animate portraits with Alibaba Cloud Model Studio (DashScope).
EMO (talking head from a portrait + speech): emo_detect → emo_generate → task_status.
Emoji (expression clip from a portrait + official template): emoji_detect → emoji_generate → task_status.
Generation only accepts boxes from a passing detection of the same image_url. Generation is paid and \
asynchronous: poll task_status (wait_seconds ≤ 50 per call); the finished MP4 is saved locally."""


def package_version() -> str:
    try:
        return version("dashscope-emo-mcp")
    except PackageNotFoundError:
        return "0.0.0+local"


def create_app(settings: Settings, http: httpx2.AsyncClient | None = None) -> MCPServer[AppContext]:
    """Build the server. `http` lets tests or a host share a client; otherwise the lifespan owns one."""

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppContext]) -> AsyncIterator[AppContext]:
        async with open_service(settings, http) as service:
            yield AppContext(service=service)

    app = MCPServer[AppContext](
        name="dashscope-emo-mcp",
        title="DashScope portrait animation (EMO, Emoji)",
        instructions=INSTRUCTIONS,
        version=package_version(),
        tools=build_tools(settings),
        extensions=[viewer_extension()],
        lifespan=lifespan,
    )
    register_spend_resource(app, settings)
    install_viewer(app)
    register_resources(app, settings)
    register_prompts(app)
    return app
