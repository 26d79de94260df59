"""Input types of the tools: strict at every level, so an agent cannot pass what it invented.

- URLs are http(s) only and of sane length; media arguments also take a local path or file:// URI
  (confined to the allowed roots by the service); none may hold a control character (U+0000-U+001F,
  U+007F: RFC 3986 allows none in a URL), refused before anything is sent;
- a box is exactly four non-negative integers with x1 < x2 and y1 < y2 (no "1" → 1 coercion);
- enums (ratio, style_level, template_id) are published inline so clients see the choices.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, StrictBool, StrictInt

MAX_URL_LENGTH = 2048
MAX_WAIT_SECONDS = 50


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The same rule for clients that check arguments against the published schema (ECMA-262 syntax).
NO_CONTROL_PATTERN = "^[^\\u0000-\\u001F\\u007F]*$"


def _refuse_control(value: str) -> None:
    found = _CONTROL.search(value)
    if found is not None:
        code = ord(found.group())
        raise ValueError(
            f"must not contain control characters (U+{code:04X} at position {found.start()}): RFC 3986 allows "
            f"none in a URL; percent-encode it (%{code:02X}) if it is really part of the address"
        )


def _check_url(value: str) -> str:
    _refuse_control(value)
    if value != value.strip() or not value:
        raise ValueError("must be a non-empty URL without surrounding spaces")
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"}:
        shown = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise ValueError(f"must be a public http:// or https:// URL (got {shown})")
    if not parts.hostname or any(ch.isspace() for ch in value):
        raise ValueError("must be a full http(s) URL with a host name and no spaces")
    return value


def _check_box(value: list[int]) -> list[int]:
    x1, y1, x2, y2 = value
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2 (got {value})")
    return value


HttpUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_URL_LENGTH,
        json_schema_extra={"format": "uri", "pattern": "^https?://"},
    ),
    AfterValidator(_check_url),
]


def _check_media(value: str) -> str:
    """A media argument: an http(s) URL with a host, a file:// URI, or a local path (checked later).

    Only the form is checked here; whether a local file exists inside the allowed roots, and
    whether its content qualifies, is the service's job (server/media/sources.py, server/media/preflight.py).
    """
    _refuse_control(value)
    if value != value.strip() or not value:
        raise ValueError("must be a non-empty URL or path without surrounding spaces")
    parts = urlsplit(value)
    # One-letter "schemes" are Windows drive letters (C:\...), i.e. paths.
    scheme = parts.scheme.lower() if len(parts.scheme) > 1 else ""
    if scheme in {"http", "https"}:
        return _check_url(value)
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ValueError("a file:// URI must name a local file, like file:///home/me/portrait.jpg")
        return value
    if scheme or value.startswith("//"):
        shown = f"scheme {parts.scheme!r}" if parts.scheme else "a network path"
        raise ValueError(f"must be a public http:// or https:// URL, a file:// URI or a local file path (got {shown})")
    return value


MediaSource = Annotated[
    str,
    Field(min_length=1, max_length=MAX_URL_LENGTH, json_schema_extra={"pattern": NO_CONTROL_PATTERN}),
    AfterValidator(_check_media),
]

Box = Annotated[
    list[Annotated[StrictInt, Field(ge=0)]],
    Field(min_length=4, max_length=4),
    AfterValidator(_check_box),
]

Ratio = Literal["1:1", "3:4"]
StyleLevel = Literal["normal", "calm", "active"]
# Longer waits are accepted and capped (see tools/tasks.py), so an agent never loses a turn to a refusal.
WaitSeconds = Annotated[float, Field(ge=0, le=86_400, strict=True)]
TaskId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


def choice(values: tuple[str, ...]) -> Any:
    """A `Literal` of values known only at run time (templates from the data file, model aliases)."""
    return Literal[values]


DryRun = Annotated[StrictBool, Field(description="Return the exact request and estimate; submit nothing.")]
AllowDuplicate = Annotated[
    StrictBool, Field(description="true: submit and bill a new task even if an identical one exists.")
]
