"""The MCP application factory. Nothing happens at import time; `create_app` wires it all."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.server.request_state import RequestStateSecurity
from mcp_types import GetPromptResult, InputRequiredResult
from pydantic import AnyUrl

from server.config import Settings
from server.metrics import NO_METRICS, Metrics
from server.runtime import Services, open_services
from server.tenancy.tenants import TenantsFile
from server.viewer.extension import install_viewer, viewer_extension
from tools import build_tools
from tools.context import AppContext, OpenServices
from tools.prompts import check_prompt_request, register_prompts
from tools.resources import not_found_error, register_resources, register_spend_resource

if TYPE_CHECKING:
    import aiohttp

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


class EmoServer(MCPServer[AppContext]):
    """MCPServer answering the protocol's error codes where the SDK's defaults are wrong or opaque:
    an unknown prompt or argument set is -32602 (the SDK: code 0), a missing resource the
    revision's not-found code (the SDK: -32603 when a handler says not found)."""

    async def get_prompt(
        self, name: str, arguments: dict[str, Any] | None = None, context: Context[AppContext, Any] | None = None
    ) -> GetPromptResult | InputRequiredResult:
        check_prompt_request(await self.list_prompts(), name, arguments)
        return await super().get_prompt(name, arguments, context)

    async def read_resource(
        self, uri: AnyUrl | str, context: Context[AppContext, Any] | None = None
    ) -> Iterable[ReadResourceContents] | InputRequiredResult:
        try:
            return await super().read_resource(uri, context)
        except ResourceNotFoundError as exc:
            raise not_found_error(str(uri), exc, context.protocol_version if context else None) from exc


def request_state_security(settings: Settings) -> RequestStateSecurity | None:
    """The shared ring (`EMO_MCP_REQUEST_STATE_KEYS`) that seals a question's follow-up state, so the
    answer may land on any worker; None keeps the SDK's per-process key (stdio, one worker). The state's
    audience is the server name, the same on every worker."""
    if not settings.request_state_keys:
        return None
    return RequestStateSecurity(keys=list(settings.request_state_keys))


def create_app(
    settings: Settings,
    session: aiohttp.ClientSession | None = None,
    *,
    metrics: Metrics = NO_METRICS,
    on_service: Callable[[Services | None], None] | None = None,
    tenants: TenantsFile | None = None,
) -> MCPServer[AppContext]:
    """Build the server. `session` lets tests or a host share an API session; otherwise the lifespan owns one.

    The HTTP transport passes `metrics` (what its /metrics serves) and `on_service`, told the open
    services and then None when they close: /healthz, /metrics and /videos are routes beside MCP, not
    tool calls, so they reach the ledgers this way rather than through a request context. `tenants`
    (HTTP with a tenants file): a service per tenant, each call served by its token's."""

    opened = OpenServices()

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppContext]) -> AsyncIterator[AppContext]:
        async with open_services(settings, session, tenants=tenants, metrics=metrics) as services:
            opened.services = services
            if on_service is not None:
                on_service(services)
            try:
                yield AppContext(services=services)
            finally:
                opened.services = None
                if on_service is not None:
                    on_service(None)

    app = EmoServer(
        name="dashscope-emo-mcp",
        title="DashScope portrait animation (EMO, Emoji)",
        instructions=INSTRUCTIONS,
        version=package_version(),
        tools=build_tools(settings),
        extensions=[viewer_extension()],
        lifespan=lifespan,
        request_state_security=request_state_security(settings),
    )
    register_spend_resource(app, opened)
    install_viewer(app)
    register_resources(app, opened)
    register_prompts(app)
    return app
