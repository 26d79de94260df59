"""The command line for people: the real `main()` against the loopback fake (served from a thread,
since `main` runs its own event loop), checking output, `--json` documents and exit codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.cli.main import main
from server.sandbox.fake_dashscope import FakeDashScope
from tests.conftest import PORTRAIT, SPEECH, TEST_KEY, make_env


@pytest.fixture
def upstream() -> Iterator[FakeDashScope]:
    fake = FakeDashScope(api_key=TEST_KEY, polls_to_finish=2)
    with fake.serve_in_thread():
        yield fake


@pytest.fixture
def env(upstream: FakeDashScope, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = make_env(upstream, tmp_path)
    for name in ("DASHSCOPE_API_KEY", "ALIBABA_CLOUD_CREDENTIALS_FILE", "ALIBABA_CLOUD_PROFILE", "EMO_MCP_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return values


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def test_detect_prints_boxes_ready_for_generate(capsys: pytest.CaptureFixture[str], env: dict[str, str]) -> None:
    code, out, _ = run(capsys, "detect", "emo", PORTRAIT)
    assert code == 0
    assert out.startswith("✓ ") and "--face-bbox " in out and "--ext-bbox " in out
    code, data = run_json(capsys, "detect", "emoji", PORTRAIT)
    assert code == 0 and data["check_pass"] is True and len(data["ext_bbox_face"]) == 4


def test_generate_detects_first_and_waits_with_progress(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], upstream: FakeDashScope
) -> None:
    code, out, err = run(capsys, "generate", "emo", PORTRAIT, "--audio-url", SPEECH, "--wait", "30")
    assert code == 0, out + err
    assert "detecting the portrait first" in err
    assert "[" in err and "] PENDING" in err  # the progress bar, on stderr
    assert "SUCCEEDED. Video saved (" in out
    (task_id,) = upstream.tasks
    video = next(Path(env["OUTPUT_DIR"]).rglob(f"{task_id}.mp4"))
    assert f"  video: {video}\n" in out
    assert video.read_bytes() == upstream.video_bytes(task_id)
    assert TEST_KEY not in out + err


def test_generate_json_is_one_document(capsys: pytest.CaptureFixture[str], env: dict[str, str]) -> None:
    code, detection = run_json(capsys, "detect", "emoji", PORTRAIT)
    face, ext = (",".join(map(str, detection[key])) for key in ("face_bbox", "ext_bbox_face"))
    code, data = run_json(
        capsys, "generate", "emoji", PORTRAIT, "--template-id", "dagong_kaixin", "--face-bbox", face, "--ext-bbox", ext
    )
    assert code == 0
    assert data["detection"] is None and data["status"] is None
    assert data["submitted"]["model"] == "emoji-v1"

    # Not finished yet: exit 4, so a script knows to ask again.
    code, status = run_json(capsys, "status", data["submitted"]["task_id"])
    assert code == 4 and status["finished"] is False
    code, status = run_json(capsys, "status", data["submitted"]["task_id"], "--wait")
    assert code == 0 and status["task_status"] == "SUCCEEDED" and Path(status["video_path"]).is_file()

    code, out, _ = run(capsys, "status")
    assert code == 0 and data["submitted"]["task_id"] in out and "SUCCEEDED" in out


def test_refusals_exit_2_before_anything_is_sent(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], upstream: FakeDashScope
) -> None:
    code, _, err = run(capsys, "generate", "emoji", PORTRAIT)
    assert code == 2 and "--template-id" in err
    code, _, err = run(capsys, "generate", "emo", PORTRAIT, "--audio-url", SPEECH, "--face-bbox", "1,2,3,4")
    assert code == 2 and "--ext-bbox" in err
    assert upstream.requests == []
    code, _, err = run(
        capsys, "generate", "emo", PORTRAIT, "--audio-url", SPEECH, "--face-bbox", "1,2,3,4", "--ext-bbox", "0,0,9,9"
    )
    assert code == 2 and "emo_detect" in err
    assert upstream.submits() == []
    with pytest.raises(SystemExit):
        main(["generate", "emoji", PORTRAIT, "--template-id", "made_up"])
    assert "invalid choice: 'made_up'" in capsys.readouterr().err
    assert upstream.requests == []  # refused before the automatic detection
    with pytest.raises(SystemExit) as bad_box:
        main(["generate", "emo", PORTRAIT, "--face-bbox", "9,9,1,1"])
    assert bad_box.value.code == 2
    assert "not a box" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["detect", "emo", "ftp://example.com/a.jpg"])
    assert "http" in capsys.readouterr().err


def test_errors_map_to_documented_exit_codes(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, data = run_json(capsys, "status", "no-such-task")
    assert code == 2 and "not in this server's ledger" in data["error"]["message"]

    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-wrong-key-000")
    code, _, err = run(capsys, "detect", "emo", PORTRAIT)
    assert code == 3 and "InvalidApiKey" in err and "sk-wrong-key-000" not in err

    monkeypatch.delenv("DASHSCOPE_API_KEY")
    code, _, err = run(capsys, "detect", "emo", PORTRAIT)
    assert code == 2 and "DASHSCOPE_API_KEY" in err


def test_templates_lists_the_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "templates")
    assert code == 0 and len(data["templates"]) == 20
    code, out, _ = run(capsys, "templates")
    assert code == 0 and "mengwa_kaixin" in out and "5 s or less" in out


def test_doctor_reports_without_revealing_the_key(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], upstream: FakeDashScope
) -> None:
    code, out, err = run(capsys, "doctor")
    assert code == 0, out
    assert "✓ key: found in the DASHSCOPE_API_KEY environment variable" in out
    assert "✓ key accepted: yes" in out
    assert "! endpoint:" in out and "not the Beijing endpoint" in out  # the fake is not Beijing: a warning
    assert f"✓ OUTPUT_DIR: {Path(env['OUTPUT_DIR']).resolve()} is writable" in out
    assert "mcp 2.3" in out
    assert "✓ spend: spend " in out and "CNY" in out
    assert TEST_KEY not in out + err
    # The probe was one free task query, nothing billed.
    assert [r.method for r in upstream.requests] == ["GET"] and "/tasks/doctor-probe-" in upstream.requests[0].path


def test_doctor_flags_a_rejected_key_and_a_credentials_file(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY")
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\ndashscope_api_key = sk-other-region-key\n")
    monkeypatch.setenv("ALIBABA_CLOUD_CREDENTIALS_FILE", str(credentials))
    code, data = run_json(capsys, "doctor")
    assert code == 1 and data["ok"] is False
    checks = {check["name"]: check for check in data["checks"]}
    assert checks["key"]["level"] == "ok" and str(credentials) in checks["key"]["detail"]
    assert checks["key accepted"]["level"] == "fail" and "401" in checks["key accepted"]["detail"]
    assert "sk-other-region-key" not in json.dumps(data)

    monkeypatch.delenv("ALIBABA_CLOUD_CREDENTIALS_FILE")
    code, data = run_json(capsys, "doctor")
    checks = {check["name"]: check for check in data["checks"]}
    assert code == 1 and checks["key"]["level"] == "fail"


def test_doctor_still_checks_the_key_when_output_dir_is_unusable(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("OUTPUT_DIR", str(blocker / "output"))
    code, data = run_json(capsys, "doctor")
    checks = {check["name"]: check for check in data["checks"]}
    assert code == 1
    assert checks["configuration"]["level"] == "fail" and "OUTPUT_DIR" in checks["configuration"]["detail"]
    assert checks["key accepted"]["level"] == "ok"


def test_sandbox_runs_a_whole_job_in_one_command(capsys: pytest.CaptureFixture[str], env: dict[str, str]) -> None:
    code, data = run_json(capsys, "--sandbox", "generate", "emoji", PORTRAIT, "--template-id", "mengwa_kun_1", "--wait")
    assert code == 0
    assert data["detection"]["sandbox"] is True and data["status"]["task_status"] == "SUCCEEDED"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], (None, False, "stdio", None)),
        (["serve", "--sandbox", "--transport", "http", "--port", "9000"], ("serve", True, "http", 9000)),
        (["--sandbox", "--transport", "http"], (None, True, "http", None)),
        (["detect", "emo", PORTRAIT, "--sandbox"], ("detect", True, "stdio", None)),
    ],
)
def test_options_land_before_or_after_the_command(argv: list[str], expected: tuple[Any, ...]) -> None:
    from server.cli.main import _parser

    args = _parser().parse_args(argv)
    assert (args.command, args.sandbox, args.transport, args.port) == expected
