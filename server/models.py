"""Facts about the four DashScope models this server wraps (names, ratios, sizes, templates)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

EMO_DETECT = "emo-detect-v1"
EMO_GENERATE = "emo-v1"
EMOJI_DETECT = "emoji-detect-v1"
EMOJI_GENERATE = "emoji-v1"
OFFICIAL_MODELS = frozenset({EMO_DETECT, EMO_GENERATE, EMOJI_DETECT, EMOJI_GENERATE})

Family = Literal["emo", "emoji"]

# What a ratio's ext_bbox turns into (EMO output is 15 fps H.264 with sound).
OUTPUT_SIZE: dict[str, str] = {"1:1": "512x512", "3:4": "512x704"}
EMOJI_OUTPUT_SIZE = "512x512"

# Evidence folders under OUTPUT_DIR, named after the seed skills.
EVIDENCE_FOLDER: dict[Family, str] = {"emo": "aliyun-emo", "emoji": "aliyun-emoji"}


@dataclass(frozen=True)
class Template:
    id: str
    series: str
    series_meaning: str
    meaning: str


@cache
def templates() -> tuple[Template, ...]:
    """The official `driven_id` catalogue, from the data file shipped with the package."""
    raw = json.loads(resources.files("server").joinpath("templates.json").read_text(encoding="utf-8"))
    return tuple(Template(**item) for item in raw["templates"])


@cache
def template_max_seconds() -> int:
    raw = json.loads(resources.files("server").joinpath("templates.json").read_text(encoding="utf-8"))
    return int(raw["typical_max_seconds"])


def template_ids() -> tuple[str, ...]:
    return tuple(t.id for t in templates())


def template_catalogue() -> list[dict[str, str | int]]:
    """The catalogue as people and clients read it (resource `emoji://templates`, `templates` command)."""
    seconds = template_max_seconds()
    return [
        {
            "id": t.id,
            "series": t.series,
            "series_meaning": t.series_meaning,
            "meaning": t.meaning,
            "typical_max_seconds": seconds,
        }
        for t in templates()
    ]
