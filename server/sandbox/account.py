"""A simulated DashScope account: one task per model at a time, each running as long as its output needs.

The plain fake finishes a task after a number of queries; this one follows the clock, as the real
service does: tasks of a model wait in submit order, the first runs for (output seconds × `rate`)
with some noise, then the next starts. The output length of an EMO task is its audio's (read from
the uploaded WAV, or from a `-<seconds>s.wav` URL); an Emoji task's is `emoji_seconds`. Used by the
polling-efficiency bench and the schedule's tests.
"""

from __future__ import annotations

import io
import random
import re
import time
import wave
from typing import Any

from server.sandbox.fake_dashscope import EMO_MODEL, FakeDashScope, FakeTask

_SECONDS_IN_URL = re.compile(r"-(\d+(?:\.\d+)?)s\.(?:wav|mp3)$")
_CLOSED = ("CANCELED", "FAILED", "UNKNOWN")


class SimulatedAccount(FakeDashScope):
    def __init__(
        self, *, rate: float, noise: float = 0.1, seed: int = 0, emoji_seconds: float = 4.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.rate = rate
        self.noise = noise
        self.emoji_seconds = emoji_seconds
        self._rng = random.Random(seed)
        self._runs: dict[str, float] = {}

    def output_seconds(self, task: FakeTask) -> float:
        if task.model != EMO_MODEL:
            return self.emoji_seconds
        audio = str(task.input.get("audio_url") or "")
        if audio.startswith("oss://") and (stored := self.objects.get(audio[len("oss://") :])) is not None:
            try:
                with wave.open(io.BytesIO(stored.data)) as clip:
                    frames, framerate = int(clip.getnframes()), int(clip.getframerate())
                return frames / framerate
            except (wave.Error, EOFError):
                pass
        found = _SECONDS_IN_URL.search(audio)
        return float(found.group(1)) if found else 5.0

    def _advance(self, task: FakeTask) -> None:
        task.query_count += 1
        self.settle(task.model)

    def settle(self, model: str) -> None:
        """Bring every task of `model` to where the clock says it is."""
        now = time.time()
        free_at = 0.0
        queue = sorted((t for t in self.tasks.values() if t.model == model), key=lambda t: t.submit_wall)
        for task in queue:
            if task.status in _CLOSED:
                continue
            if task.status == "SUCCEEDED":
                free_at = max(free_at, task.end_wall or 0.0)
                continue
            seconds = self.output_seconds(task)
            run = self._runs.setdefault(
                task.task_id, seconds * self.rate * (1 + self._rng.uniform(-self.noise, self.noise))
            )
            start = max(task.submit_wall, free_at)
            if now >= start + run:
                task.status, task.scheduled_wall, task.end_wall = "SUCCEEDED", start, start + run
                task.finished_at = time.monotonic() - (now - task.end_wall)
                task.video_duration = round(seconds, 3)
                free_at = task.end_wall
                continue
            if now >= start:
                task.status, task.scheduled_wall = "RUNNING", start
            return
