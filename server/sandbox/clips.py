"""Real, playable H.264 clips for the sandbox's finished tasks, one per output frame size.

DashScope's EMO answers 512x512 (ratio 1:1) or 512x704 (3:4) with sound, and Emoji 512x512 silent
(shared/dashscope-contract.md). The sandbox serves the matching clip from `clips/` (package data),
so the demo ends with videos a person can open; each carries a visible "SANDBOX" label. How the
clips were made is in `clips/README.md`.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

from server.sandbox.fake_dashscope import FakeDashScope, FakeTask

# Output frame size (width, height) of each clip, as the contract gives it.
CLIPS: dict[str, tuple[int, int]] = {
    "emo-1x1.mp4": (512, 512),
    "emo-3x4.mp4": (512, 704),
    "emoji.mp4": (512, 512),
}


@cache
def clip_bytes(name: str) -> bytes:
    return files("server.sandbox").joinpath("clips", name).read_bytes()


def clip_name(task: FakeTask) -> str:
    """Emoji (its input names a template, `driven_id`), else EMO by the ratio its ext_bbox implies."""
    if "driven_id" in task.input:
        return "emoji.mp4"
    x1, y1, x2, y2 = task.input["ext_bbox"]
    return "emo-1x1.mp4" if x2 - x1 == y2 - y1 else "emo-3x4.mp4"


def clip_for(task: FakeTask) -> bytes:
    return clip_bytes(clip_name(task))


def sandbox_upstream(**options: Any) -> FakeDashScope:
    """The fake DashScope of `--sandbox` and the demo: finished tasks download a real clip."""
    return FakeDashScope(video_for=clip_for, **options)
