"""Helpers for the viewer tests: an MCP client that negotiates MCP Apps, and results in wire form."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

from mcp import Client
from mcp.client.extension import ClientExtension, advertise
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID
from pydantic import BaseModel

from server.app import create_app
from server.config import Settings
from server.viewer.extension import IMAGE_TEMPLATE, VIDEO_TEMPLATE


def apps_extension() -> ClientExtension:
    """What a host that renders MCP Apps advertises in `initialize`."""
    return advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})


@asynccontextmanager
async def apps_client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(create_app(settings), extensions=[apps_extension()]) as session:
        yield session


def image_uri(image_url: str) -> str:
    return IMAGE_TEMPLATE.replace("{?url}", "?url=" + quote(image_url, safe=""))


def video_uri(task_id: str) -> str:
    return VIDEO_TEMPLATE.replace("{task_id}", quote(task_id, safe=""))


def wire(result: BaseModel) -> dict[str, Any]:
    """A result as JSON-RPC carries it (camelCase), which is what a host hands the app."""
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)
