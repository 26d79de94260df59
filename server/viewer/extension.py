"""The MCP Apps viewer: one `ui://` HTML app, bound to the detect tools and `task_status`.

A host that negotiated MCP Apps (`io.modelcontextprotocol/ui`) renders `VIEWER_URI` beside the
result of a bound tool and hands the app that result. The app then asks the host, through the
bridge, for two bounded resources this module serves: the portrait (fetched by the server, so
the sandboxed frame needs no network) and the finished video. Tool results themselves do not
change, so a client without Apps gets exactly what it got before, and nothing is sent twice.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
from mcp.server.apps import Apps, client_supports_apps
from mcp.server.mcpserver import Context, MCPServer, ResourceSecurity
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError

from server.domain.service import Service
from server.errors import EmoMcpError
from server.media.addresses import AddressPolicy, blocked_reason, is_loopback
from server.media.preview import (
    MAX_IMAGE_BYTES,
    MAX_VIDEO_BYTES,
    PreviewUnavailableError,
    fetch_image,
    local_image,
    read_video,
)
from server.media.sources import resolve_media
from server.tenancy.current import current_tenant

VIEWER_URI = "ui://dashscope-emo/viewer.html"
IMAGE_TEMPLATE = "dashscope-emo://viewer/image{?url}"
VIDEO_TEMPLATE = "dashscope-emo://viewer/video/{task_id}"
VIEWER_HTML = "viewer.html"

# Shown next to a finished task (CNY per billed output second); emoji-v1's is a reseller's figure.


def viewer_meta() -> dict[str, Any]:
    """The `_meta` that binds a tool to the viewer (a fresh dict per tool)."""
    return {"ui": {"resourceUri": VIEWER_URI}}


def viewer_html() -> str:
    """The app, with the server's limits filled in (it makes no requests of its own)."""
    html = resources.files("server.viewer").joinpath(VIEWER_HTML).read_text(encoding="utf-8")
    config = {
        "imageTemplate": IMAGE_TEMPLATE,
        "videoTemplate": VIDEO_TEMPLATE,
        "maxImageBytes": MAX_IMAGE_BYTES,
        "maxVideoBytes": MAX_VIDEO_BYTES,
    }
    # "<" is escaped so the JSON can never close the <script> element that holds it.
    return html.replace("__VIEWER_CONFIG__", json.dumps(config).replace("<", "\\u003c"))


def viewer_extension() -> Apps:
    """The Apps extension for `MCPServer(extensions=...)`: advertises the capability, serves the app."""
    apps = Apps()
    apps.add_html_resource(
        VIEWER_URI,
        viewer_html(),
        name="viewer",
        title="Portrait, boxes, task progress and video",
        description="Shows a detection's boxes over the portrait, a task's progress and the finished video.",
        prefers_border=True,
    )
    return apps


async def _service(ctx: Context[Any, Any]) -> Service:
    """The asking tenant's service (the viewer reads only its own portraits and videos)."""
    services = getattr(ctx.request_context.lifespan_context, "services", None)
    try:
        service = await services.get(current_tenant.get()) if services is not None else None
    except EmoMcpError as exc:
        raise ResourceError(str(exc)) from exc
    assert isinstance(service, Service)
    return service


def _require_apps(ctx: Context[Any, Any]) -> None:
    """These resources exist for the app; other clients have no use for a server-side fetch."""
    if not client_supports_apps(ctx):
        raise ResourceError(
            "Viewer resources are served only to clients that negotiated MCP Apps (io.modelcontextprotocol/ui)."
        )


def _policy_for(service: Service) -> AddressPolicy:
    """The pre-flight address policy, except that media may live where DashScope itself lives: a
    loopback endpoint (the sandbox, a local test double) serves its portraits from loopback too.
    It judges the address each connection actually goes to (the pinned transport)."""
    upstream_is_local = is_loopback(urlsplit(service.settings.base_url).hostname or "")

    def policy(host: str, address: str) -> str | None:
        if upstream_is_local and is_loopback(host) and is_loopback(address):
            return None
        return blocked_reason(address)

    return policy


def install_viewer(app: MCPServer[Any]) -> None:
    """Register the portrait and video resources the app reads through the host."""

    @app.resource(
        IMAGE_TEMPLATE,
        name="viewer_image",
        title="Portrait of a detection",
        description="The bytes of a portrait that emo_detect or emoji_detect checked, for the viewer.",
        mime_type="application/octet-stream",
        # A local portrait is an absolute path; server.media confines it to the allowed roots.
        security=ResourceSecurity(reject_absolute_paths=False),
    )
    async def viewer_image(ctx: Context[Any, Any], url: str = "") -> bytes:
        _require_apps(ctx)
        service = await _service(ctx)
        roots = service.settings.allowed_roots
        try:
            # A local portrait is confined to the allowed roots and read once: the bytes keyed by their
            # content here (as in provenance) are the bytes shown.
            ref = await anyio.to_thread.run_sync(
                lambda: resolve_media("image_url", url, roots, max_bytes=MAX_IMAGE_BYTES) if url else None
            )
        except EmoMcpError as exc:
            raise ResourceError(str(exc)) from exc
        if ref is None or not service.ledger.detections_of(ref.identity):
            raise ResourceNotFoundError(
                "No detection of this image_url is recorded; the viewer shows only portraits that "
                "emo_detect or emoji_detect checked."
            )
        try:
            media = local_image(ref) if ref.is_local else await fetch_image(url, policy=_policy_for(service))
        except PreviewUnavailableError as exc:
            raise ResourceError(str(exc)) from exc
        return media.data

    @app.resource(
        VIDEO_TEMPLATE,
        name="viewer_video",
        title="Video of a finished task",
        description=f"The downloaded MP4 of a SUCCEEDED task, up to {MAX_VIDEO_BYTES // (1024 * 1024)} MB.",
        mime_type="video/mp4",
    )
    async def viewer_video(task_id: str, ctx: Context[Any, Any]) -> bytes:
        _require_apps(ctx)
        service = await _service(ctx)
        record = service.ledger.get_task(task_id)
        if record is None:
            raise ResourceNotFoundError(f"Task {task_id} is not in this server's ledger.")
        if record.status != "SUCCEEDED" or not record.video_path:
            raise ResourceError(
                f"Task {task_id} has no downloaded video ({record.status}); call task_status until it succeeds."
            )
        try:
            media = await read_video(Path(record.video_path), service.settings.output_dir)
        except PreviewUnavailableError as exc:
            raise ResourceError(str(exc)) from exc
        return media.data
