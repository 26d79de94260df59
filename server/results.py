"""What the domain layer returns: typed results shared by the MCP tools and the CLI.

Each model's JSON schema is the tool's published `outputSchema`; `summary()` is the one-line
text a person (or a client that ignores structured content) reads first.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

WARNINGS = "Pre-flight notes (e.g. a URL not fetched here)."


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sandbox: bool = Field(description="From the built-in sandbox, not DashScope.")

    def _prefix(self) -> str:
        return "[sandbox] " if self.sandbox else ""

    def summary(self) -> str:  # pragma: no cover - every subclass overrides
        raise NotImplementedError


class EmoDetection(_Result):
    check_pass: bool
    image_url: str
    ratio: str
    output_size: str = Field(description="Video width x height.")
    face_bbox: list[int] | None = Field(description="[x1, y1, x2, y2] in pixels, like ext_bbox.")
    ext_bbox: list[int] | None
    humanoid: bool | None = None
    code: str | None = None
    message: str | None = None
    request_id: str | None = None
    model: str
    evidence_dir: str = Field(description="Folder with the request and response.")
    warnings: list[str] = Field(default_factory=list, description=WARNINGS)

    def summary(self) -> str:
        if self.check_pass:
            return (
                f"{self._prefix()}emo_detect passed ({self.ratio}, video {self.output_size}): "
                f"face_bbox {self.face_bbox}, ext_bbox {self.ext_bbox}. Next: emo_generate with these boxes."
            )
        return (
            f"{self._prefix()}emo_detect did not pass: {self.code}: {self.message}. "
            "Pick another portrait (one clear, front-facing person) and detect again."
        )


class EmojiDetection(_Result):
    check_pass: bool = Field(description="Derived: both boxes returned, no error.")
    image_url: str
    output_size: str
    face_bbox: list[int] | None = Field(description="Upstream bbox_face: [x1, y1, x2, y2] in pixels.")
    ext_bbox_face: list[int] | None
    code: str | None = None
    message: str | None = None
    request_id: str | None = None
    model: str
    evidence_dir: str
    warnings: list[str] = Field(default_factory=list, description=WARNINGS)

    def summary(self) -> str:
        if self.check_pass:
            return (
                f"{self._prefix()}emoji_detect passed: face_bbox {self.face_bbox}, ext_bbox_face "
                f"{self.ext_bbox_face}. Next: emoji_generate with these boxes and a template_id."
            )
        return (
            f"{self._prefix()}emoji_detect did not pass: {self.code}: {self.message}. "
            "Pick another portrait (one front-facing, unoccluded person) and detect again."
        )


class Submitted(_Result):
    task_id: str | None = Field(description="Null for a dry run.")
    task_status: str = Field(description="DRY_RUN when nothing was submitted.")
    model: str
    request_id: str | None = None
    output_size: str
    evidence_dir: str
    next_step: str
    estimated_cost_cny: float | None = None
    estimate_basis: str | None = Field(default=None, description="Seconds x rate, and caveats.")
    dry_run: bool = False
    payload: dict[str, Any] | None = Field(default=None, description="The request a dry run would send.")
    warnings: list[str] = Field(default_factory=list, description=WARNINGS)
    inputs: dict[str, str] | None = Field(default=None, description="Local media files, sent as oss:// uploads.")
    deduplicated: bool = False
    note: str | None = None

    def summary(self) -> str:
        cost = f" Estimated cost {self.estimated_cost_cny:.4f} CNY." if self.estimated_cost_cny is not None else ""
        if self.dry_run:
            return (
                f"{self._prefix()}Dry run of {self.model}: request saved in {self.evidence_dir}.{cost} {self.next_step}"
            )
        if self.deduplicated:
            return f"{self._prefix()}{self.note} Task {self.task_id} ({self.task_status}). {self.next_step}"
        return (
            f"{self._prefix()}Submitted {self.model} task {self.task_id} ({self.task_status}).{cost} {self.next_step}"
        )


class TaskStatus(_Result):
    task_id: str
    task_status: str
    finished: bool
    model: str | None = None
    submit_time: str | None = Field(None, description="Times are Beijing time (UTC+8), as DashScope reports them.")
    scheduled_time: str | None = None
    end_time: str | None = None
    video_url: str | None = None
    video_path: str | None = None
    video_link: str | None = Field(
        None, description="Signed HTTPS link to the video, openable anywhere until it expires (HTTP servers)."
    )
    video_sha256: str | None = None
    video_bytes: int | None = None
    usage: dict[str, Any] | None = Field(None, description="video_duration (billed seconds), video_ratio.")
    code: str | None = None
    message: str | None = None
    download_error: str | None = None
    last_error: str | None = Field(None, description="Last upstream error while polling (retried).")
    queue_ahead: int | None = None
    eta_seconds: float | None = Field(None, description="Seconds until the expected end; eta_basis says how.")
    expected_end: str | None = Field(None, description="Expected end, ISO 8601 UTC.")
    eta_basis: str | None = None
    local_id: str | None = Field(None, description="The id you asked by: the submit's, before its outcome was known.")
    evidence_dir: str | None = Field(None, description="Request/response folder; left out when it holds video_path.")
    actual_cost_cny: float | None = Field(default=None, description="Billed: usage.video_duration x rate.")
    estimated_cost_cny: float | None = Field(default=None, description="Estimate made at submit.")

    def summary(self) -> str:
        head = f"{self._prefix()}Task {self.task_id}: {self.task_status}"
        if self.task_status == "SUCCEEDED" and self.video_path:
            cost = f" Cost {self.actual_cost_cny:.4f} CNY." if self.actual_cost_cny is not None else ""
            # The path itself is in video_path (and a resource_link): not a third copy here.
            return f"{head}. Video saved ({self.video_bytes} bytes).{cost}"
        if self.task_status == "SUCCEEDED" and self.code:
            return f"{head}, but the video could not be saved: {self.message}"
        if self.task_status == "SUCCEEDED":
            return (
                f"{head}; the video is being downloaded in the background"
                + (f" (last attempt: {self.download_error})" if self.download_error else "")
                + ". Call task_status again with wait_seconds."
            )
        if self.task_status in {"FAILED", "CANCELED", "UNKNOWN", "NOT_FOUND"}:
            return f"{head}: {self.code or ''} {self.message or ''}".rstrip() + "."
        if self.task_status == "SUBMITTING":
            return (
                f"{head}: {self.message or 'DashScope has not answered the submit yet.'} The server is waiting "
                "for that answer; call task_status again with wait_seconds. Do not submit again."
            )
        if self.task_status == "SUBMIT_OUTCOME_UNKNOWN":
            return (
                f"{head}: {self.message or 'the submit has no answer.'} The server is looking for it in "
                "DashScope's task list; call task_status again with wait_seconds. Do not submit again."
            )
        ahead = f" {self.queue_ahead} of this server's tasks are ahead of it." if self.queue_ahead else ""
        eta = f" Expected to finish in about {self.eta_seconds:.0f} s." if self.eta_seconds is not None else ""
        return f"{head}.{ahead}{eta} Not finished; call task_status again with wait_seconds to keep waiting."
