"""Secrets stay in: an upstream echoing the key reaches no result, log line, ledger or evidence file,
and what the server writes (the ledger, evidence, its folders) is readable by its owner only."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from server.app import create_app
from server.config import load_settings
from server.redaction import REDACTED, install_log_redaction, redact
from server.sandbox.fake_dashscope import FakeDashScope
from server.store.ledger import LEDGER_FILE
from server.transport.http import TOKEN_ENV, build_http_app, http_security
from tests import media_files
from tests.conftest import TEST_KEY, all_files_text, call_ok, detect_emo, make_env, submit_emo, text_of

pytestmark = pytest.mark.anyio

ECHO = f"request had Authorization: Bearer {TEST_KEY}; the key {TEST_KEY} is not allowed here"


class Lines(logging.Handler):
    """Every record the server logs, formatted as a log file would hold it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    install_log_redaction()  # as the command line does once logging is configured: every root handler
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def everything_stored(output: Path) -> str:
    """The ledger (with its WAL) and every evidence file, as bytes decoded leniently."""
    return all_files_text(output)


async def test_an_upstream_echoing_the_key_reaches_no_result_log_ledger_or_evidence(
    client: Client, fake: FakeDashScope, tmp_path: Path, log_lines: Lines
) -> None:
    shown: list[Any] = []
    _, submitted = await submit_emo(client)
    task_id = submitted["task_id"]

    # A query refused with the key in its message: retried by the watcher, reported as last_error.
    fake.inject("GET", f"/tasks/{task_id}", status=400, body={"code": "InvalidParameter", "message": ECHO}, times=10**6)
    status = await call_ok(client, "task_status", {"task_id": task_id})
    shown.append(status)
    assert REDACTED in status["last_error"] and "Authorization" in status["last_error"]
    assert any("query failed" in line for line in log_lines.lines)

    # The task then fails upstream with the key in its message: stored in the ledger, then shown.
    fake.clear_injections()
    fake.fail(task_id, code="InternalError.Algo", message=ECHO)
    failed = await call_ok(client, "task_status", {"task_id": task_id, "wait_seconds": 5})
    shown.append(failed)
    assert failed["task_status"] == "FAILED" and REDACTED in failed["message"]

    # A detection refused with the key in its message: a billed, recorded failure.
    fake.inject(
        "POST",
        "/services/aigc/image2video/face-detect",
        status=400,
        body={"code": "InvalidFile.NoHuman", "message": ECHO, "request_id": "r-1"},
    )
    refused = await client.call_tool("emo_detect", {"image_url": "https://images.example.com/nobody.jpg"})
    shown.append(text_of(refused))
    shown.append(refused.structured_content)

    for where, text in {
        "results": repr(shown),
        "logs": "\n".join(log_lines.lines),
        "ledger and evidence": everything_stored(tmp_path / "output"),
    }.items():
        assert TEST_KEY not in text, where
        assert "Bearer sk-" not in text, where


async def test_a_key_that_does_not_look_like_one_is_redacted_by_its_value(
    fake: FakeDashScope, tmp_path: Path, log_lines: Lines
) -> None:
    """A deployment's key need not look like sk-...: the key in use is redacted by its value."""
    key = "plain-looking-key-4242424242"
    fake.api_key = key
    settings = load_settings(make_env(fake, tmp_path, DASHSCOPE_API_KEY=key), cwd=tmp_path)
    async with Client(create_app(settings)) as session:
        _, submitted = await submit_emo(session)
        fake.inject("GET", "/tasks/", status=400, body={"code": "InvalidParameter", "message": f"bad {key}"}, times=99)
        status = await call_ok(session, "task_status", {"task_id": submitted["task_id"]})
    assert f"bad {REDACTED}" in status["last_error"]
    assert key not in "\n".join(log_lines.lines)
    assert key not in everything_stored(tmp_path / "output")


def test_the_http_token_is_redacted_once_the_app_is_built(tmp_path: Path) -> None:
    token = "token-for-http-clients-0123456789"
    settings = load_settings({"OUTPUT_DIR": str(tmp_path), "HOME": str(tmp_path)}, cwd=tmp_path)
    build_http_app(settings, http_security("127.0.0.1", {TOKEN_ENV: token}))
    assert redact(f"client sent {token}") == f"client sent {REDACTED}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.def-ghi", "Authorization: ***"),
        ('{"authorization": "Bearer xyz"}', '{"authorization": "***"}'),
        ("headers={'Authorization': 'Basic dXNlcjpwYXNz'}", "headers={'Authorization': '***'}"),
        ("sent bearer eyJhbGciOi.J9 to it", "sent bearer *** to it"),
        # Built at run time, so the tree holds nothing shaped like a real key.
        ("key " + "sk-" + "fake" * 8 + ".", "key ***."),
        ("task-0123456789abcdef and risk-assessment-2024", "task-0123456789abcdef and risk-assessment-2024"),
    ],
)
def test_redaction_removes_headers_tokens_and_keys_and_leaves_the_rest(text: str, expected: str) -> None:
    assert redact(text) == expected


# ---------------------------------------------------------------- owner-only files


def modes(root: Path) -> dict[str, int]:
    """Permission bits of everything below `root` (relative path -> mode), `root` itself excluded."""
    return {str(path.relative_to(root)): stat.S_IMODE(path.lstat().st_mode) for path in root.rglob("*")}


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


async def run_a_chain(fake: FakeDashScope, tmp_path: Path) -> dict[str, int]:
    """Detect (a local file and a URL), generate, download: every kind of file the server writes.
    The modes are read while the server runs (the WAL files go when the ledger closes)."""
    output = tmp_path / "output"
    settings = load_settings(make_env(fake, tmp_path), cwd=tmp_path)
    portrait = media_files.image(tmp_path / "portrait.png")
    async with Client(create_app(settings)) as session:
        await call_ok(session, "emo_detect", {"image_url": str(portrait)})
        await detect_emo(session)
        _, submitted = await submit_emo(session)
        status = await call_ok(session, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 10})
        assert status["task_status"] == "SUCCEEDED"
        return modes(output)


async def test_the_ledger_evidence_and_their_folders_are_owner_only(
    fake: FakeDashScope, tmp_path: Path, umask: int
) -> None:
    found = await run_a_chain(fake, tmp_path)
    output = tmp_path / "output"
    for name in (LEDGER_FILE, LEDGER_FILE + "-wal", LEDGER_FILE + "-shm"):
        assert found.pop(name) == 0o600, name
    videos = {name for name in found if name.endswith(".mp4")}
    assert videos and all(found[str(Path(name).parent)] == 0o700 for name in videos)
    folders = {name: mode for name, mode in found.items() if (output / name).is_dir()}
    files = {name: mode for name, mode in found.items() if name not in folders and name not in videos}
    assert any(name.endswith("request.json") for name in files) and any("polls" in name for name in files)
    assert {name for name, mode in folders.items() if mode != 0o700} == set()
    assert {name for name, mode in files.items() if mode != 0o600} == set()


async def test_the_video_itself_is_owner_only(fake: FakeDashScope, tmp_path: Path, umask: int) -> None:
    videos = {name: mode for name, mode in (await run_a_chain(fake, tmp_path)).items() if name.endswith(".mp4")}
    assert videos and set(videos.values()) == {0o600}
