"""One error hierarchy for the whole server.

Every failure an agent must read is an `EmoMcpError`; the tool layer turns it into an MCP
tool error (`isError`) carrying `str(error)`. Messages say what to do next and never hold
the API key.
"""

from __future__ import annotations

import sqlite3

KEY_HELP = (
    "Set the DASHSCOPE_API_KEY environment variable in the MCP client's server config (or "
    "DASHSCOPE_API_KEY_FILE_PATH to a file holding only the key), or put "
    "`dashscope_api_key = sk-...` under the [default] section (or the profile named by "
    "ALIBABA_CLOUD_PROFILE) of ~/.alibabacloud/credentials, then restart the server."
)


class EmoMcpError(Exception):
    """Base of every anticipated failure; the message is written for the agent."""


class ConfigError(EmoMcpError):
    """The server's own configuration is wrong (environment variables, folders)."""


class MissingApiKeyError(ConfigError):
    def __init__(self) -> None:
        super().__init__(f"No DashScope API key is configured. {KEY_HELP}")


class RefusedInputError(EmoMcpError):
    """The server refused the call before anything was sent upstream."""


class ProvenanceError(RefusedInputError):
    """Boxes (or an image) that did not come from a passing detection of that same image."""


class PreflightError(RefusedInputError):
    """A local (or fetched) file broke one of the service's input limits: refused for free, here."""


class CostRefusedError(RefusedInputError):
    """The job's estimate is above the configured ceiling, or its confirmation was not given."""


class CeilingRefusedError(CostRefusedError):
    """The job's estimate is above the per-job ceiling (EMO_MCP_MAX_COST_CNY or the tenant's max_cost_cny)."""


class BudgetRefusedError(CostRefusedError):
    """The job's estimate would take the tenant's spend for the UTC day over its daily_budget_cny."""


class ModelNotAllowedError(RefusedInputError):
    """The tenant's `models` list does not include the model asked for."""


class TenantRequiredError(RefusedInputError):
    """A request of a multi-tenant server that names no tenant it serves (the HTTP layer refuses such
    requests first; this guards the domain should one get through)."""


class TaskNotFoundError(RefusedInputError):
    """A task id this server never saw and DashScope does not know either."""

    def __init__(self, message: str, task_id: str | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id  # the id asked about, for the audit of cross-tenant attempts


class UpstreamError(EmoMcpError):
    """DashScope answered with an error envelope (HTTP 4xx/5xx)."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        request_id: str | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.code = code
        self.upstream_message = message
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"DashScope refused the request: {self.code} (HTTP {self.status_code})"
        if self.upstream_message:
            text += f": {self.upstream_message.rstrip('.')}."
        else:
            text += "."
        hint = hint_for(self.code, self.status_code)
        if hint:
            text += f" {hint}"
        if self.request_id:
            text += f" [request_id {self.request_id}]"
        return text


class AuthenticationError(UpstreamError):
    """401: wrong key, or a key of another region."""


class PermissionDeniedError(UpstreamError):
    """403: model not activated, or an async-header mismatch (a bug here)."""


class NotFoundError(UpstreamError):
    """404: wrong model name."""


class InvalidInputError(UpstreamError):
    """400: the inputs were refused (URL, file, moderation, parameters)."""


class RateLimitError(UpstreamError):
    """429: throttled or quota exhausted."""


class ServiceError(UpstreamError):
    """5xx: a fault on DashScope's side."""


class StorageError(EmoMcpError):
    """The local disk or ledger failed (a full disk, a database locked by another process)."""


class LedgerUnavailable(StorageError):
    """The ledger's database (PostgreSQL, `EMO_MCP_DATABASE_URL`) did not answer in time.

    Nothing paid is sent while it is away: a detect or a submit that cannot be recorded would break
    provenance or hide a billed task.
    """


class UpstreamUnavailableError(EmoMcpError):
    """The service could not be reached or did not answer in time (a read; safe to retry)."""


class UnreadableAnswerError(UpstreamUnavailableError):
    """DashScope (or its storage) answered, but with nothing this server can read or trust.

    Nothing is concluded from such an answer: the message says what it means for the call (billed
    or not, done or not) and whether calling again is safe.
    """


class SubmitOutcomeUnknownError(EmoMcpError):
    """A submit was sent but no answer came back: a task may exist and may be billed."""


# Hints keyed by exact code, then by code prefix.
_HINTS: dict[str, str] = {
    "InvalidApiKey": (
        "The API key was not accepted. EMO and Emoji are served only in the Beijing region "
        "(https://dashscope.aliyuncs.com/api/v1); a key from another region answers 401. " + KEY_HELP
    ),
    "AccessDenied.Unpurchased": "Activate the model in the Model Studio console for this account.",
    "AccessDenied": "The account may not have this model activated in the Model Studio console.",
    "ModelNotFound": "Check the `model` argument: use the official model name or a configured deployment.",
    "InvalidParameter.DataInspection": (
        "DashScope could not download the media; host it where mainland China can reach it quickly."
    ),
    "InvalidURL": (
        "Check that the URL is public and reachable, the image is JPG/PNG/BMP/WEBP, and the audio is "
        "WAV/MP3 under 15 MB and under 60 s."
    ),
    "InvalidFile": "The portrait does not qualify; pick another image (one clear, front-facing person).",
    "DataInspectionFailed": "Content moderation refused the input; use different media.",
    "Arrearage": "The Alibaba Cloud account is overdue; top it up before retrying.",
    "Throttling": "DashScope is throttling this account; wait a little and call again.",
    "InternalError": "A fault on DashScope's side; retry later.",
}


def hint_for(code: str, status_code: int) -> str:
    if code in _HINTS:
        return _HINTS[code]
    prefix = code.split(".", 1)[0]
    if prefix in _HINTS:
        return _HINTS[prefix]
    if status_code >= 500:
        return _HINTS["InternalError"]
    return ""


def upstream_error(
    status_code: int, code: str, message: str, request_id: str | None, retry_after: float | None = None
) -> UpstreamError:
    """Pick the subclass for an HTTP status."""
    cls: type[UpstreamError]
    if status_code == 401:
        cls = AuthenticationError
    elif status_code == 403:
        cls = PermissionDeniedError
    elif status_code == 404:
        cls = NotFoundError
    elif status_code == 429:
        cls = RateLimitError
    elif status_code >= 500:
        cls = ServiceError
    else:
        cls = InvalidInputError
    return cls(status_code, code, message, request_id, retry_after=retry_after)


class DuplicateSubmitError(RefusedInputError):
    """An identical submit is still unresolved (its outcome unknown): sending again may bill twice."""


class CannotCancelError(EmoMcpError):
    """DashScope cancels only PENDING tasks; this one is running or finished."""


def as_task_error(exc: Exception, doing: str) -> EmoMcpError:
    """Any failure of a background step as the error recorded on its task (what the agent reads).

    Anticipated failures stay as they are; the disk's and the ledger's become a `StorageError`;
    anything else (a bug, an exception nobody foresaw) is named for what it is.
    """
    if isinstance(exc, EmoMcpError):
        return exc
    if isinstance(exc, OSError | sqlite3.Error):
        return StorageError(f"{doing}: the local disk or ledger failed ({exc}); retrying.")
    text = "".join(c if c.isprintable() else "?" for c in str(exc))[:120]
    return EmoMcpError(f"{doing}: an unexpected {type(exc).__name__} ({text}); retrying.")
