"""Signed video links and the audit trail (issue 15): what a forger, a clock and a crowd of workers can do."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from server.config import parse_link_secret
from server.errors import ConfigError
from server.redaction import redact, register_secret
from server.tenancy.audit import MAX_LINE_BYTES, AuditLog, NoAudit
from server.tenancy.links import VIDEO_PREFIX, LinkSigner

ROOT = Path(__file__).resolve().parents[1]
SECRET = bytes(range(32))
OLD_SECRET = bytes(range(100, 132))


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def split(link: str) -> tuple[tuple[str, str, str], str, str]:
    """The link's (tenant, task, file) as a server decodes them, and its exp and sig."""
    parts = urlsplit(link)
    query = parse_qs(parts.query)
    assert VIDEO_PREFIX in parts.path
    tenant, task, name = (unquote(part) for part in parts.path.split(VIDEO_PREFIX, 1)[1].split("/"))
    return (tenant, task, name), query["exp"][0], query["sig"][0]


# --- links -------------------------------------------------------------------------------------------


def test_link_round_trip_and_shape() -> None:
    clock = Clock()
    signer = LinkSigner(SECRET, "https://mcp.example.com/", 3600, clock=clock)
    link = signer.link("acme", "task-1", "video.mp4")
    assert link.startswith("https://mcp.example.com/videos/acme/task-1/video.mp4?exp=1700003600&sig=")
    (tenant, task, name), exp, sig = split(link)
    assert "=" not in sig and len(sig) == 43
    assert signer.verify(tenant, task, name, exp, sig) is None
    assert signer.path_of("acme", "task-1", "video.mp4") == "/videos/acme/task-1/video.mp4"
    # Another worker with the same secret honours it.
    assert LinkSigner(SECRET, "https://mcp.example.com", clock=clock).verify(tenant, task, name, exp, sig) is None


def test_link_keeps_the_public_urls_path_prefix() -> None:
    signer = LinkSigner(SECRET, "https://example.com/emo/", clock=Clock())
    link = signer.link("acme", "t1", "a b.mp4")
    assert link.startswith("https://example.com/emo/videos/acme/t1/a%20b.mp4?exp=")
    assert signer.path_of("acme", "t1", "a b.mp4") == "/videos/acme/t1/a%20b.mp4"
    names, exp, sig = split(link)
    assert names == ("acme", "t1", "a b.mp4")
    assert signer.verify(*names, exp, sig) is None


def test_link_expires_by_the_clock() -> None:
    clock = Clock()
    signer = LinkSigner(SECRET, "https://mcp.example.com", 60, clock=clock)
    (tenant, task, name), exp, sig = split(signer.link("acme", "t1", "v.mp4"))
    clock.now += 59
    assert signer.verify(tenant, task, name, exp, sig) is None
    clock.now += 1
    problem = signer.verify(tenant, task, name, exp, sig)
    assert problem is not None and problem.reason == "expired"
    assert "expired" in problem.message


def test_altered_links_are_invalid() -> None:
    clock = Clock()
    signer = LinkSigner(SECRET, "https://mcp.example.com", clock=clock)
    (tenant, task, name), exp, sig = split(signer.link("acme", "t1", "v.mp4"))
    flipped = ("B" if sig[0] == "A" else "A") + sig[1:]
    later = str(int(exp) + 86400)
    attempts = [
        (tenant, task, name, exp, flipped),
        (tenant, task, name, later, sig),
        (tenant, task, name, "0" + exp, sig),
        (tenant, task, name, "+" + exp, sig),
        (tenant, task, name, exp, sig + "="),
        (tenant, task, name, None, sig),
        (tenant, task, name, exp, None),
        ("globex", task, name, exp, sig),  # another tenant's path with this signature
        (tenant, "t2", name, exp, sig),
        (tenant, task, "w.mp4", exp, sig),
        ("acme:t1", "", name, exp, sig),
    ]
    for attempt in attempts:
        problem = signer.verify(*attempt)
        assert problem is not None and problem.reason == "invalid", attempt
    # A forged link is invalid, not expired, even long after its exp: nobody learns the signature was close.
    clock.now += 10 * 86400
    problem = signer.verify(tenant, task, name, exp, flipped)
    assert problem is not None and problem.reason == "invalid"


def test_encoding_is_unambiguous() -> None:
    """Parts that concatenate alike sign differently."""
    signer = LinkSigner(SECRET, "https://mcp.example.com", clock=Clock())
    names, exp, sig = split(signer.link("ab", "c", "d.mp4"))
    assert signer.verify(*names, exp, sig) is None
    assert signer.verify("a", "bc", "d.mp4", exp, sig) is not None
    assert signer.verify("ab", "cd", ".mp4", exp, sig) is not None


def test_previous_secret_still_verifies_but_does_not_sign() -> None:
    clock = Clock()
    old = LinkSigner(OLD_SECRET, "https://mcp.example.com", clock=clock)
    names, exp, sig = split(old.link("acme", "t1", "v.mp4"))
    rotated = LinkSigner(SECRET, "https://mcp.example.com", previous=[OLD_SECRET], clock=clock)
    assert rotated.verify(*names, exp, sig) is None
    fresh_names, fresh_exp, fresh_sig = split(rotated.link("acme", "t1", "v.mp4"))
    assert old.verify(*fresh_names, fresh_exp, fresh_sig) is not None
    assert LinkSigner(SECRET, "https://mcp.example.com", clock=clock).verify(*names, exp, sig) is not None


@pytest.mark.parametrize(
    "parts",
    [
        ("..", "t1", "v.mp4"),
        ("acme", "t1", "../../etc/passwd"),
        ("acme", "t1", "a/b.mp4"),
        ("acme", "t1", "a\\b.mp4"),
        ("acme", "t1", "v..mp4"),
        ("acme", "t1\x00", "v.mp4"),
        ("acme", "", "v.mp4"),
        ("acme", "t1", "\ud800.mp4"),
        ("acme", "t1", "x" * 300),
    ],
)
def test_traversal_parts_are_refused(parts: tuple[str, str, str]) -> None:
    signer = LinkSigner(SECRET, "https://mcp.example.com", clock=Clock())
    with pytest.raises(ValueError, match="not a safe video path"):
        signer.link(*parts)
    _, exp, sig = split(signer.link("acme", "t1", "v.mp4"))
    problem = signer.verify(*parts, exp, sig)
    assert problem is not None and problem.reason == "invalid"


def test_parse_link_secret_accepts_hex_and_base64url() -> None:
    raw = secrets.token_hex(32)
    assert parse_link_secret(raw) == bytes.fromhex(raw)
    assert redact(f"secret={raw}") == "secret=***"
    key = secrets.token_bytes(48)
    assert parse_link_secret(base64.urlsafe_b64encode(key).decode().rstrip("=")) == key
    assert parse_link_secret(base64.urlsafe_b64encode(key).decode()) == key


@pytest.mark.parametrize(
    "raw",
    [
        "",
        secrets.token_hex(16),  # 16 bytes
        "not hex, not base64!",
        "ab" * 32,  # 32 bytes of one value
        base64.urlsafe_b64encode(b"\x00" * 40).decode(),
    ],
)
def test_parse_link_secret_refuses_weak_or_garbled(raw: str) -> None:
    with pytest.raises(ConfigError, match="EMO_MCP_LINK_SECRET") as caught:
        parse_link_secret(raw)
    assert "openssl rand -hex 32" in str(caught.value)
    if raw:
        assert raw not in str(caught.value)


def test_signer_refuses_bad_configuration() -> None:
    with pytest.raises(ConfigError, match="EMO_MCP_PUBLIC_URL"):
        LinkSigner(SECRET, "mcp.example.com")
    with pytest.raises(ConfigError, match="EMO_MCP_PUBLIC_URL"):
        LinkSigner(SECRET, "https://mcp.example.com/?a=1")
    with pytest.raises(ConfigError, match="EMO_MCP_LINK_TTL"):
        LinkSigner(SECRET, "https://mcp.example.com", 0)
    with pytest.raises(ConfigError, match="EMO_MCP_LINK_TTL"):
        LinkSigner(SECRET, "https://mcp.example.com", float("inf"))
    with pytest.raises(ConfigError, match="EMO_MCP_LINK_SECRET"):
        LinkSigner(b"short", "https://mcp.example.com")


def test_signer_registers_its_secret_for_redaction() -> None:
    key = secrets.token_bytes(32)
    LinkSigner(key, "https://mcp.example.com")
    assert key.hex() not in redact(f"oops {key.hex()}")
    b64 = base64.urlsafe_b64encode(key).decode().rstrip("=")
    assert b64 not in redact(f"oops {b64}")


# --- audit -------------------------------------------------------------------------------------------


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_audit_lines_are_json_with_the_fields(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "audit.jsonl"
    audit = AuditLog(path, clock=Clock(1_700_000_000.5))
    audit.record(tenant="acme", tool="emo_generate", outcome="submitted", task_id="t1", estimate_cny=1.2, models=2)
    audit.record(tenant="acme", tool="emo_detect", outcome="refused", reason="budget", request_id=None)
    audit.close()
    first, second = read_lines(path)
    assert first == {
        "time": "2023-11-14T22:13:20.500Z",
        "tenant": "acme",
        "tool": "emo_generate",
        "outcome": "submitted",
        "task_id": "t1",
        "estimate_cny": 1.2,
        "models": 2,
    }
    assert second == {
        "time": "2023-11-14T22:13:20.500Z",
        "tenant": "acme",
        "tool": "emo_detect",
        "outcome": "refused",
        "reason": "budget",
    }
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert audit.failures == 0


def test_audit_never_writes_a_registered_secret(tmp_path: Path) -> None:
    secret = "tenant-token-" + secrets.token_hex(8)
    register_secret(secret)
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.record(
        tenant="acme", tool="emo_generate", outcome="failed", reason=f"upstream said {secret}", note=f"k={secret}"
    )
    audit.record(tenant="acme", tool="emo_detect", outcome="failed", reason="Authorization: Bearer abcdefghijkl")
    audit.close()
    text = path.read_text(encoding="utf-8")
    assert secret not in text and "abcdefghijkl" not in text
    assert read_lines(path)[0]["reason"] == "upstream said ***"


def test_audit_keeps_lines_short_and_fixed_fields_intact(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.record(tenant="acme", tool="emo_generate", outcome="refused", reason="é\x01" * 5000, time="forged")
    audit.close()
    raw = path.read_bytes()
    assert len(raw) < MAX_LINE_BYTES
    (line,) = read_lines(path)
    assert line["truncated"] is True and line["tenant"] == "acme" and str(line["reason"]).endswith("…")
    assert line["extra.time"] == "forged" and line["time"] != "forged"


def test_audit_rotates_by_size_and_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=1000, backups=2)
    for seq in range(200):
        audit.record(tenant="acme", tool="emo_detect", outcome="passed", seq=seq)
    audit.close()
    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert [file.name for file in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.lock"]
    kept = [read_lines(tmp_path / name) for name in ("audit.jsonl.2", "audit.jsonl.1", "audit.jsonl")]
    assert all(0 < (tmp_path / name).stat().st_size <= 1000 for name in ("audit.jsonl.2", "audit.jsonl.1"))
    seqs = [line["seq"] for lines in kept for line in lines]
    assert seqs == list(range(200 - len(seqs), 200))  # the newest lines, in order, none missing in between


def test_audit_writer_notices_a_rotation_by_another(tmp_path: Path) -> None:
    """A descriptor left on the rotated file would write into a backup (or a deleted file): it is reopened."""
    path = tmp_path / "audit.jsonl"
    idle, busy = AuditLog(path, max_bytes=500, backups=3), AuditLog(path, max_bytes=500, backups=3)
    idle.record(tenant="a", tool="emo_detect", outcome="passed", seq=0)
    for seq in range(1, 20):
        busy.record(tenant="b", tool="emo_detect", outcome="passed", seq=seq)
    idle.record(tenant="a", tool="emo_detect", outcome="passed", seq=20)
    idle.close()
    busy.close()
    assert read_lines(path)[-1]["seq"] == 20


WRITER = """
import sys, time
from pathlib import Path
from server.tenancy.audit import AuditLog
path, writer, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
audit = AuditLog(path, max_bytes=20000, backups=1000)
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.001)
for seq in range(500):
    audit.record(tenant=f"tenant-{writer}", tool="emo_generate", outcome="submitted", writer=writer, seq=seq,
                 reason="x" * (seq % 97))
audit.close()
assert audit.failures == 0, audit.failures
"""


def test_audit_from_many_processes_loses_and_tears_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(writer), str(go)], cwd=ROOT, env=env, stderr=subprocess.PIPE
        )
        for writer in range(4)
    ]
    go.touch()
    errors = [run.communicate(timeout=120)[1].decode() for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, "\n".join(errors)
    files = [file for file in tmp_path.glob("audit.jsonl*") if not file.name.endswith(".lock")]
    assert len(files) > 5  # it did rotate, many times, while all four wrote
    seen: dict[int, list[int]] = {writer: [] for writer in range(4)}
    for file in files:
        raw = file.read_bytes()
        assert raw.endswith(b"\n") and len(raw) <= 20000
        for line in raw.decode("utf-8").splitlines():
            record = json.loads(line)  # a torn or interleaved line would not parse
            assert record["tenant"] == f"tenant-{record['writer']}"
            assert record["reason"] == "x" * (record["seq"] % 97)
            seen[record["writer"]].append(record["seq"])
    for writer, seqs in seen.items():
        assert sorted(seqs) == list(range(500)), writer


def test_audit_failure_does_not_reach_the_caller(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    caplog.set_level(logging.ERROR, logger="server.tenancy.audit")
    audit = AuditLog(blocker / "audit.jsonl")
    for _ in range(3):
        audit.record(tenant="acme", tool="emo_generate", outcome="submitted", cost_cny=1.0)
    assert audit.failures == 3
    assert len([record for record in caplog.records if record.levelno == logging.ERROR]) == 1
    # The folder appears: the next line is written, with no restart.
    blocker.unlink()
    audit.record(tenant="acme", tool="emo_generate", outcome="submitted", cost_cny=1.0)
    assert audit.failures == 3
    assert len(read_lines(blocker / "audit.jsonl")) == 1
    audit.close()


def test_no_audit_is_silent(tmp_path: Path) -> None:
    audit = NoAudit()
    audit.record(tenant="local", tool="emo_detect", outcome="passed", extra_field=1)
    audit.close()
    assert audit.failures == 0
