"""The MCP Apps viewer on the wire: advertised, bound, served, bounded, and invisible to other clients."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import BlobResourceContents, CallToolResult, TextResourceContents

from server.app import INSTRUCTIONS, create_app, package_version
from server.config import Settings, load_settings
from server.media.preview import PreviewUnavailableError, fetch_image, image_mime_type, read_video
from server.runtime import Services, open_service
from server.sandbox.fake_dashscope import FakeDashScope
from server.viewer.extension import VIEWER_URI, viewer_html
from tests.apps import apps_client, image_uri, video_uri
from tests.conftest import SPEECH, TEST_KEY, call_ok, make_env
from tests.test_preflight import PORTRAIT_PNG, loopback_hosts, rebinding, stand_in
from tools import build_tools
from tools.context import AppContext

pytestmark = pytest.mark.anyio

BOUND = {"emo_detect", "emoji_detect", "task_status"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def finished_task(client: Client, image_url: str) -> dict[str, Any]:
    detection = await call_ok(client, "emo_detect", {"image_url": image_url})
    submitted = await call_ok(
        client,
        "emo_generate",
        {
            "image_url": image_url,
            "audio_url": SPEECH,
            "face_bbox": detection["face_bbox"],
            "ext_bbox": detection["ext_bbox"],
        },
    )
    status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 10})
    assert status["task_status"] == "SUCCEEDED"
    return status


async def test_capability_is_advertised_and_the_detect_and_status_tools_carry_the_viewer(settings: Settings) -> None:
    async with apps_client(settings) as client:
        assert client.server_capabilities.extensions is not None
        assert EXTENSION_ID in client.server_capabilities.extensions
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    for name, tool in tools.items():
        ui = (tool.meta or {}).get("ui")
        if name in BOUND:
            assert ui == {"resourceUri": VIEWER_URI}, name
        else:
            assert ui is None, name


async def test_viewer_resource_reads_back_as_a_self_contained_mcp_app(settings: Settings) -> None:
    async with apps_client(settings) as client:
        listed = {str(r.uri): r for r in (await client.list_resources()).resources}
        read = await client.read_resource(VIEWER_URI)
    assert listed[VIEWER_URI].mime_type == APP_MIME_TYPE
    [content] = read.contents
    assert isinstance(content, TextResourceContents)
    assert content.mime_type == APP_MIME_TYPE
    html = content.text
    assert html == viewer_html()
    assert html.lower().startswith("<!doctype html>")
    assert "__VIEWER_CONFIG__" not in html
    # Nothing the host's sandbox would block: no external URL, web font, or network API.
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", html, flags=re.IGNORECASE)
    for forbidden in ("@import", "url(", "@font-face", "fetch(", "XMLHttpRequest", "WebSocket", "EventSource"):
        assert forbidden not in html, forbidden
    for protocol in ("ui/initialize", "ui/notifications/initialized", "ui/notifications/tool-result"):
        assert protocol in html


def _volatile(data: dict[str, Any]) -> set[str]:
    keys: tuple[str, ...] = ("request_id", "evidence_dir", "task_id", "submit_time", "scheduled_time")
    keys += ("end_time", "video_url", "video_path", "video_sha256", "local_id")
    return {str(data[key]) for key in keys if data.get(key)}


def _normalized(result: CallToolResult) -> dict[str, Any]:
    """The whole result as sent, with per-run values (ids, paths, times) replaced by a marker."""
    dumped = result.model_dump(by_alias=True, mode="json")
    text = repr(dumped)
    for value in sorted(_volatile(result.structured_content or {}), key=len, reverse=True):
        text = text.replace(value, "<volatile>")
    return {"text": text}


@asynccontextmanager
async def todays_server(settings: Settings) -> AsyncIterator[Client]:
    """The server as it was before the viewer: same tools, no Apps extension, no viewer resources."""

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppContext]) -> AsyncIterator[AppContext]:
        async with open_service(settings) as service:
            yield AppContext(services=Services(service))

    app = MCPServer(
        name="dashscope-emo-mcp",
        title="DashScope portrait animation (EMO, Emoji)",
        instructions=INSTRUCTIONS,
        version=package_version(),
        tools=build_tools(settings),
        lifespan=lifespan,
    )
    async with Client(app) as session:
        yield session


async def _chain(client: Client, fake: FakeDashScope) -> list[CallToolResult]:
    image = fake.image_url("same-for-both")
    results = [await client.call_tool("emo_detect", {"image_url": image, "ratio": "3:4"})]
    results.append(await client.call_tool("emoji_detect", {"image_url": "https://img.example.com/noface.jpg"}))
    detection = results[0].structured_content or {}
    arguments = {"image_url": image, "audio_url": SPEECH}
    arguments |= {"face_bbox": detection["face_bbox"], "ext_bbox": detection["ext_bbox"]}
    results.append(await client.call_tool("emo_generate", arguments))
    task_id = (results[-1].structured_content or {})["task_id"]
    results.append(await client.call_tool("task_status", {"task_id": task_id, "wait_seconds": 10}))
    results.append(await client.call_tool("task_status", {"task_id": "no-such-task"}))
    return results


async def test_a_client_without_apps_gets_exactly_todays_results(fake: FakeDashScope, tmp_path: Path) -> None:
    before = load_settings(make_env(fake, tmp_path / "before"), cwd=tmp_path)
    after = load_settings(make_env(fake, tmp_path / "after"), cwd=tmp_path)
    async with todays_server(before) as client:
        expected = [_normalized(r) for r in await _chain(client, fake)]
    async with Client(create_app(after)) as client:
        results = await _chain(client, fake)
    assert not any(ui_meta_in_result(r) for r in results)
    got = [_normalized(r) for r in results]
    assert got == expected
    assert [r["text"].count("'type': 'text'") for r in got] == [1] * len(got)  # one text block, nothing else


def ui_meta_in_result(result: CallToolResult) -> bool:
    meta = result.meta or {}
    # A resource_link to a downloaded video is part of every client's result (issue 4); UI is anything else.
    extra = [block for block in result.content if block.type not in {"text", "resource_link"}]
    return "ui" in meta or EXTENSION_ID in meta or bool(extra)


async def test_viewer_resources_are_refused_to_clients_without_apps(client: Client, fake: FakeDashScope) -> None:
    image = fake.image_url("dave")
    await call_ok(client, "emo_detect", {"image_url": image})
    with pytest.raises(MCPError, match="negotiated MCP Apps"):
        await client.read_resource(image_uri(image))
    assert not [r for r in fake.requests if r.path.startswith("/images/")]  # nothing was fetched


async def test_portrait_resource_is_the_detected_image_fetched_by_the_server(
    settings: Settings, fake: FakeDashScope
) -> None:
    image = fake.image_url("carol")
    async with apps_client(settings) as client:
        await call_ok(client, "emoji_detect", {"image_url": image})
        read = await client.read_resource(image_uri(image))
        with pytest.raises(MCPError, match="No detection of this image_url"):
            await client.read_resource(image_uri(fake.image_url("never-detected")))
    [content] = read.contents
    assert isinstance(content, BlobResourceContents)
    async with httpx2.AsyncClient() as http:
        original = (await http.get(image)).content
    assert base64.b64decode(content.blob) == original
    assert original.startswith(PNG_MAGIC)
    assert [r.path for r in fake.requests if r.path.startswith("/images/")] == ["/images/carol.png"] * 2


async def test_video_resource_is_the_downloaded_file(settings: Settings, fake: FakeDashScope) -> None:
    async with apps_client(settings) as client:
        status = await finished_task(client, fake.image_url("erin"))
        read = await client.read_resource(video_uri(status["task_id"]))
        with pytest.raises(MCPError, match="not in this server's ledger"):
            await client.read_resource(video_uri("00000000-0000-0000-0000-000000000000"))
    [content] = read.contents
    assert isinstance(content, BlobResourceContents)
    assert content.mime_type == "video/mp4"
    assert (
        base64.b64decode(content.blob) == Path(status["video_path"]).read_bytes() == fake.video_bytes(status["task_id"])
    )


async def test_video_resource_of_an_unfinished_task_says_to_call_task_status(tmp_path: Path) -> None:
    upstream = FakeDashScope(api_key=TEST_KEY, auto_progress=False)
    async with upstream.serve():
        settings = load_settings(make_env(upstream, tmp_path), cwd=tmp_path)
        async with apps_client(settings) as client:
            image = upstream.image_url("frank")
            detection = await call_ok(client, "emo_detect", {"image_url": image})
            arguments = {"image_url": image, "audio_url": SPEECH}
            arguments |= {"face_bbox": detection["face_bbox"], "ext_bbox": detection["ext_bbox"]}
            submitted = await call_ok(client, "emo_generate", arguments)
            with pytest.raises(MCPError, match=r"PENDING.*call task_status"):
                await client.read_resource(video_uri(submitted["task_id"]))


# ---------------------------------------------------------------- the bounded fetch and read, directly


async def test_fetch_image_stops_at_the_size_limit(fake: FakeDashScope) -> None:
    media = await fetch_image(fake.image_url("gina"))
    assert media.mime_type == "image/png"
    with pytest.raises(PreviewUnavailableError, match="over the viewer's"):
        await fetch_image(fake.image_url("gina"), limit=len(media.data) - 1)


async def test_fetch_image_refuses_what_is_not_an_image_over_http(fake: FakeDashScope) -> None:
    with pytest.raises(PreviewUnavailableError, match="http"):
        await fetch_image("oss://dashscope-instant/abc/portrait.png")
    with pytest.raises(PreviewUnavailableError, match="HTTP 404"):
        await fetch_image(fake.origin + "/files/no-such-task.mp4")
    fake.inject("GET", "/images/", status=200, body={"not": "an image"})
    with pytest.raises(PreviewUnavailableError, match="did not return a PNG, JPEG, BMP or WEBP"):
        await fetch_image(fake.image_url("hank"))


async def test_fetch_image_gives_up_after_its_deadline(fake: FakeDashScope) -> None:
    fake.inject("GET", "/images/", passthrough=True, delay=30)
    with pytest.raises(PreviewUnavailableError, match="took longer than"):
        await fetch_image(fake.image_url("ivy"), deadline=0.2)


def test_image_formats_are_recognised_by_their_first_bytes() -> None:
    assert image_mime_type(PNG_MAGIC + b"rest") == "image/png"
    assert image_mime_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert image_mime_type(b"BM\x00\x00") == "image/bmp"
    assert image_mime_type(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert image_mime_type(b"<html>") is None
    assert image_mime_type(b"RIFF\x10\x00\x00\x00WAVEfmt ") is None


async def test_read_video_is_bounded_and_stays_inside_the_output_folder(tmp_path: Path) -> None:
    root = tmp_path / "output"
    root.mkdir()
    video = root / "task.mp4"
    video.write_bytes(b"\x00" * 1000)
    assert (await read_video(video, root, limit=1000)).data == video.read_bytes()
    with pytest.raises(PreviewUnavailableError, match=r"over the .* open it from .*task\.mp4"):
        await read_video(video, root, limit=999)
    outside = tmp_path / "elsewhere.mp4"
    outside.write_bytes(b"\x00")
    with pytest.raises(PreviewUnavailableError, match="missing"):
        await read_video(outside, root)


async def test_local_portrait_is_served_from_disk_and_a_changed_file_is_not(
    settings: Settings, fake: FakeDashScope, tmp_path: Path
) -> None:
    from tests.media_files import image as make_image

    portrait = make_image(tmp_path / "me.png", (600, 700))
    async with apps_client(settings) as client:
        detection = await call_ok(client, "emo_detect", {"image_url": str(portrait)})
        read = await client.read_resource(image_uri(detection["image_url"]))
        [content] = read.contents
        assert isinstance(content, BlobResourceContents)
        assert base64.b64decode(content.blob) == portrait.read_bytes()
        make_image(portrait, (600, 700), color="#204080")  # same path, other content: no detection of it
        with pytest.raises(MCPError, match="No detection of this image_url"):
            await client.read_resource(image_uri(str(portrait)))
        with pytest.raises(MCPError, match="EMO_MCP_ALLOWED_ROOTS"):
            await client.read_resource(image_uri("/etc/hostname"))


async def test_portrait_on_a_private_address_is_not_fetched(settings: Settings, fake: FakeDashScope) -> None:
    private = "http://10.1.2.3/portrait.png"  # a detection of it is on record, but it is not public
    async with apps_client(settings) as client:
        await call_ok(client, "emo_detect", {"image_url": private})
        with pytest.raises(MCPError, match="non-public"):
            await client.read_resource(image_uri(private))


async def test_the_viewer_fetch_never_reaches_loopback_through_a_rebinding_name() -> None:
    """Each connection goes to the address vetted from its own lookup; redirects likewise."""
    resolve, asked = rebinding("127.0.0.2", "127.0.0.1")
    async with loopback_hosts({"127.0.0.2": PORTRAIT_PNG, "127.0.0.1": b"internal: secret"}) as (port, hosts):
        outcomes = []
        for _ in range(4):
            try:
                media = await fetch_image(
                    f"http://localhost:{port}/p.png", policy=stand_in("127.0.0.2"), resolve=resolve
                )
                outcomes.append(media.data)
            except PreviewUnavailableError as exc:
                outcomes.append(str(exc).encode())
    assert hosts["127.0.0.1"].hits == []
    assert outcomes[0::2] == [PORTRAIT_PNG] * 2
    assert all(b"non-public addresses" in o and b"127.0.0.1 is a loopback address" in o for o in outcomes[1::2])
    assert asked == ["localhost"] * 4
