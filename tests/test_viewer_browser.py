"""The viewer in a real browser: headless Debian Chromium driven by Playwright, never a downloaded browser.

A small host page (tests/viewer_host.html) plays the chat client's side of the MCP Apps bridge:
it renders the server's own `ui://` HTML in a sandboxed frame under the spec's restrictive default
CSP, hands it a tool result obtained from the server through a real MCP client session, and
forwards the app's `tools/call` / `resources/read` to that session. Every request for a non-data
URL is aborted and recorded, so the app is also proven to need no network.

Set EMO_MCP_UPDATE_DOCS=1 to refresh the README screenshots under docs/.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_types import TextResourceContents

from server.config import Settings, load_settings
from server.sandbox.fake_dashscope import IMAGE_SIZE, FakeDashScope
from server.viewer.extension import VIEWER_URI
from tests.apps import apps_client, image_uri, wire
from tests.conftest import SPEECH, TEST_KEY, call_ok, make_env

if TYPE_CHECKING:
    from playwright.async_api import Browser, Frame, Page

ROOT = Path(__file__).resolve().parent.parent
HOST_PAGE = Path(__file__).with_name("viewer_host.html")
VIDEO_FIXTURE = Path(__file__).with_name("fixtures") / "talking-head.mp4"
CHROMIUM = os.environ.get("EMO_MCP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_SECONDS = 20  # an upper bound for a condition to become true, never a measured duration
FACE_RGB = (0xFF, 0x0A, 0x78)
EXT_RGB = (0x00, 0xB4, 0xFF)


def _why_no_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed: python -m pip install -e '.[dev]'"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM}: apt-get install chromium (or set EMO_MCP_CHROMIUM)"
    return None


pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(_why_no_browser() is not None, reason=str(_why_no_browser())),
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Host:
    """The test's half of the host: what the page forwards to the MCP server, and what went wrong."""

    page: Page
    frame: Frame
    client: Client
    forwarded: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tool_called: anyio.Event = field(default_factory=anyio.Event)

    async def forward(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.forwarded.append((method, params))
        if method == "tools/call":
            self.tool_called.set()
        try:
            if method == "tools/call":
                return {"result": wire(await self.client.call_tool(params["name"], params.get("arguments") or {}))}
            if method == "resources/read":
                return {"result": wire(await self.client.read_resource(params["uri"]))}
        except MCPError as exc:
            return {"error": {"code": exc.code, "message": exc.message}}
        return {"error": {"code": -32601, "message": f"the test host does not forward {method}"}}

    async def wait(self, expression: str) -> None:
        """Poll until `expression` holds in the app's frame (Playwright's waiter uses eval, which the CSP forbids)."""
        with anyio.fail_after(WAIT_SECONDS):
            while not await self.frame.evaluate(f"() => Boolean({expression})"):  # noqa: ASYNC110
                await anyio.sleep(0.05)

    async def screenshot(self, name: str, tmp_path: Path, *, docs: bool = True) -> bytes:
        shot = await self.page.locator("#app").screenshot()
        (tmp_path / name).write_bytes(shot)
        if docs and os.environ.get("EMO_MCP_UPDATE_DOCS") == "1":
            (ROOT / "docs").mkdir(exist_ok=True)
            (ROOT / "docs" / name).write_bytes(shot)
        return shot


@asynccontextmanager
async def hosted(
    browser: Browser,
    client: Client,
    arguments: dict[str, Any],
    result: Any,
    *,
    width: int = 720,
    theme: str = "light",
) -> AsyncIterator[Host]:
    """Render the viewer for one tool result, as a host does after a model's tool call."""
    context = await browser.new_context(viewport={"width": width, "height": 900}, device_scale_factor=1)
    page = await context.new_page()
    try:
        [content] = (await client.read_resource(VIEWER_URI)).contents
        assert isinstance(content, TextResourceContents)
        host = Host(page=page, frame=page.main_frame, client=client)

        async def block(route: Any) -> None:
            host.external.append(route.request.url)
            await route.abort()

        await page.route(re.compile(r"^(?!data:|about:)"), block)
        page.on("console", lambda message: host.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: host.errors.append(str(error)))
        await page.expose_function("mcpForward", host.forward)
        await page.set_content(HOST_PAGE.read_text(encoding="utf-8"))
        await page.evaluate(
            "([html, options]) => window.host.start(html, options)", [content.text, {"width": width, "theme": theme}]
        )
        element = await page.wait_for_selector("#app")
        assert element is not None
        frame = await element.content_frame()
        assert frame is not None
        host.frame = frame
        await page.evaluate("([input, result]) => window.host.deliver(input, result)", [arguments, wire(result)])
        yield host
        assert host.external == []
        assert host.errors == []
    finally:
        await context.close()


def _pixels(png: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def _near(pixel: tuple[int, int, int], color: tuple[int, int, int], tolerance: int = 48) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, color, strict=True))


def _assert_box_drawn(image: Any, box: list[int], color: tuple[int, int, int], scale: float) -> None:
    """The box's left, right and bottom edges are `color` where the coordinates say; its middle is not.

    The 4 px stroke lies just inside the box; the browser's downscaling softens its sides, so each
    sample accepts the best of three pixels across the stroke (within 1 px of its centre line).
    """
    x1, y1, x2, y2 = (v * scale for v in box)
    inset = 2.0
    for t in (0.3, 0.4, 0.5, 0.6, 0.7):
        y, x = y1 + (y2 - y1) * t, x1 + (x2 - x1) * t
        for px, py, dx, dy in ((x1 + inset, y, 1, 0), (x2 - inset, y, 1, 0), (x, y2 - inset, 0, 1)):
            across = [image.getpixel((round(px + k * dx), round(py + k * dy))) for k in (-1, 0, 1)]
            assert any(_near(p, color) for p in across), f"no {color} near ({px:.0f}, {py:.0f}) of {box}: {across}"
    for px, py in (((x1 + x2) / 2, (y1 + y2) / 2), (x1 - 8, (y1 + y2) / 2), (x2 + 8, (y1 + y2) / 2)):
        if 0 <= px < image.width and 0 <= py < image.height:
            pixel = image.getpixel((round(px), round(py)))
            assert not _near(pixel, color, 24), f"box colour {color} away from the edges at ({px:.0f}, {py:.0f})"


async def test_detection_view_draws_the_boxes_where_the_coordinates_say(
    browser: Browser, settings: Settings, fake: FakeDashScope, tmp_path: Path
) -> None:
    arguments = {"image_url": fake.image_url("alice"), "ratio": "3:4"}
    async with apps_client(settings) as client:
        result = await client.call_tool("emo_detect", arguments)
        detection = result.structured_content or {}
        async with hosted(browser, client, arguments, result) as host:
            await host.wait("document.querySelector('#portrait').dataset.state === 'image'")
            await host.wait("document.querySelector('#portrait-note').textContent.startsWith('Portrait 1000')")
            canvas = host.frame.locator("#portrait")
            image = _pixels(await canvas.screenshot())
            scale = image.width / IMAGE_SIZE[0]
            assert abs(image.height - IMAGE_SIZE[1] * scale) <= 1.5
            _assert_box_drawn(image, detection["face_bbox"], FACE_RGB, scale)
            _assert_box_drawn(image, detection["ext_bbox"], EXT_RGB, scale)
            boxes = await host.frame.locator("#box-list").inner_text()
            label = await canvas.get_attribute("aria-label") or ""
            header = await host.frame.locator("#detection-title").inner_text()
            reason = await host.frame.locator("#detection-reason").inner_text()
            await host.screenshot("viewer-detection.png", tmp_path)
    assert "emo_detect" in header and "passed" in header
    assert "512x704" in reason and "3:4" in reason
    for key, name in (("face_bbox", "Face"), ("ext_bbox", "Animated area")):
        x1, y1, x2, y2 = detection[key]
        expected = f"x {x1}–{x2}, y {y1}–{y2} ({x2 - x1}×{y2 - y1} px)"
        assert f"{name} ({key}): {expected}" in boxes
        assert expected in label  # the text alternative of the drawn picture
    assert ("resources/read", {"uri": image_uri(arguments["image_url"])}) in host.forwarded


async def test_failed_detection_shows_the_reason_and_the_boxes_survive_a_missing_portrait(
    browser: Browser, settings: Settings, fake: FakeDashScope
) -> None:
    failed = {"image_url": fake.image_url("noface-carl")}
    passed = {"image_url": fake.image_url("dana")}
    async with apps_client(settings) as client:
        result = await client.call_tool("emoji_detect", failed)
        async with hosted(browser, client, failed, result) as host:
            await host.wait("document.querySelector('#portrait').dataset.state === 'image'")
            header = await host.frame.locator("#detection-title").inner_text()
            reason = await host.frame.locator("#detection-reason").inner_text()
            boxes = await host.frame.locator("#box-list").inner_text()
        result = await client.call_tool("emo_detect", passed)
        fake.inject("GET", "/images/", status=404, times=5)  # the portrait is gone by the time the viewer asks
        async with hosted(browser, client, passed, result) as host:
            await host.wait("document.querySelector('#portrait').dataset.state === 'blank'")
            await host.wait("document.querySelector('#portrait-note').textContent.includes('unavailable')")
            note = await host.frame.locator("#portrait-note").inner_text()
            listed = await host.frame.locator("#box-list").inner_text()
    assert "emoji_detect" in header and "did not pass" in header
    assert "InvalidFile.FacePose" in reason
    assert "No boxes" in boxes
    assert "HTTP 404" in note
    assert "face_bbox" in listed and "ext_bbox" in listed


@pytest.mark.parametrize(("width", "theme"), [(400, "dark"), (1200, "light")])
async def test_readable_at_400_and_1200_px_in_both_schemes(
    browser: Browser, settings: Settings, fake: FakeDashScope, tmp_path: Path, width: int, theme: str
) -> None:
    arguments = {"image_url": fake.image_url("bob")}
    async with apps_client(settings) as client:
        result = await client.call_tool("emoji_detect", arguments)
        async with hosted(browser, client, arguments, result, width=width, theme=theme) as host:
            await host.wait("document.querySelector('#portrait').dataset.state === 'image'")
            layout = await host.frame.evaluate(
                """() => {
                    const root = document.documentElement;
                    const canvas = document.querySelector('#portrait').getBoundingClientRect();
                    const list = document.querySelector('#box-list').getBoundingClientRect();
                    const style = getComputedStyle(document.body);
                    return { scroll: root.scrollWidth, client: root.clientWidth, canvasRight: canvas.right,
                             listLeft: list.left, background: style.backgroundColor, color: style.color };
                }"""
            )
            await host.screenshot(f"viewer-{width}-{theme}.png", tmp_path, docs=False)
    assert layout["scroll"] <= layout["client"] == width  # nothing sticks out sideways
    assert layout["canvasRight"] <= width
    side_by_side = layout["listLeft"] >= layout["canvasRight"]
    assert side_by_side == (width >= 720)
    background, text = _luminance(layout["background"]), _luminance(layout["color"])
    if theme == "dark":
        assert background < 0.2 < 0.7 < text
    else:
        assert text < 0.2 < 0.7 < background


def _luminance(css: str) -> float:
    red, green, blue = (int(v) for v in re.findall(r"\d+", css)[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


async def test_task_view_follows_the_task_to_a_playable_video(browser: Browser, tmp_path: Path) -> None:
    video = VIDEO_FIXTURE.read_bytes()
    upstream = FakeDashScope(api_key=TEST_KEY, auto_progress=False, video=video)
    async with upstream.serve():
        settings = load_settings(make_env(upstream, tmp_path), cwd=tmp_path)
        async with apps_client(settings) as client:
            image = upstream.image_url("talking-head")
            detection = await call_ok(client, "emo_detect", {"image_url": image})
            arguments = {"image_url": image, "audio_url": SPEECH}
            arguments |= {"face_bbox": detection["face_bbox"], "ext_bbox": detection["ext_bbox"]}
            task_id = (await call_ok(client, "emo_generate", arguments))["task_id"]
            upstream.set_status(task_id, "RUNNING")
            status_arguments = {"task_id": task_id, "wait_seconds": 0}
            running = await client.call_tool("task_status", status_arguments)
            assert (running.structured_content or {})["task_status"] == "RUNNING"
            async with hosted(browser, client, status_arguments, running, theme="dark") as host:
                await host.wait("document.querySelector('#task').dataset.status === 'RUNNING'")
                await host.wait("!document.querySelector('#task-progress').hidden")
                progress = await host.frame.locator("#task-progress-text").inner_text()
                # The app keeps asking through the bridge; the task then ends upstream.
                with anyio.fail_after(WAIT_SECONDS):
                    await host.tool_called.wait()
                upstream.complete(task_id)
                await host.wait("document.querySelector('#task').dataset.status === 'SUCCEEDED'")
                await host.wait("document.querySelector('#video').readyState >= 3")  # HAVE_FUTURE_DATA: playable
                # Show a decoded frame from the middle of the clip (for the screenshot, and as proof of decoding).
                await host.frame.evaluate(
                    "async () => { const v = document.querySelector('#video'); v.muted = true; await v.play(); "
                    "v.pause(); v.currentTime = 1.0; }"
                )
                await host.wait(
                    "(v => !v.seeking && v.currentTime >= 1.0 && v.readyState >= 3)(document.querySelector('#video'))"
                )
                player = await host.frame.evaluate(
                    """() => { const v = document.querySelector('#video');
                               return { src: v.src, duration: v.duration, width: v.videoWidth,
                                        error: v.error && v.error.code }; }"""
                )
                facts = await host.frame.locator("#task-facts").inner_text()
                path = await host.frame.locator("#task-path").inner_text()
                await host.screenshot("viewer-task.png", tmp_path)
        final = await finished_status(settings, task_id)
    assert progress.startswith("RUNNING")
    call = next(params for method, params in host.forwarded if method == "tools/call")
    assert call["name"] == "task_status" and call["arguments"]["task_id"] == task_id
    assert player["error"] is None
    assert player["src"] == "data:video/mp4;base64," + base64.b64encode(video).decode()
    assert player["width"] == 512 and abs(player["duration"] - 2.0) < 0.2
    assert final["video_path"] in path
    assert "Submitted" in facts and "Ended" in facts
    assert "5.2 s billed × 0.08 CNY/s ≈ 0.42 CNY" in facts


async def finished_status(settings: Settings, task_id: str) -> dict[str, Any]:
    """The finished task as the ledger now has it (answered without asking upstream)."""
    async with apps_client(settings) as client:
        return await call_ok(client, "task_status", {"task_id": task_id})
