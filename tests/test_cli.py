"""The command line for people: the real `main()` against the loopback fake (served from a thread,
since `main` runs its own event loop), checking output, `--json` documents and exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import av
import pytest
from mcp import Client, StdioServerParameters

from server.cli.demo import platform_opener, run_demo
from server.cli.main import main
from server.sandbox.fake_dashscope import FakeDashScope
from tests import media_files
from tests.conftest import PORTRAIT, SPEECH, TEST_KEY, make_env, text_of


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


def decoded(path: Path) -> tuple[str, int, int, int, bool]:
    """Codec, frame size, frames actually decoded and whether there is sound: by libavcodec (PyAV)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        has_audio = bool(container.streams.audio)
        frames = sum(1 for _ in container.decode(video=0))
        return video.codec_context.name, video.codec_context.width, video.codec_context.height, frames, has_audio


def demo_videos(out: str) -> dict[str, Path]:
    found = re.findall(r"^  (EMO 1:1|EMO 3:4|Emoji), \d+x\d+ +(\S+\.mp4)$", out, flags=re.MULTILINE)
    return {label: Path(path) for label, path in found}


def test_demo_ends_with_videos_a_decoder_plays(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    code, out, _ = run(capsys, "demo")
    assert code == 0, out
    videos = demo_videos(out)
    assert set(videos) == {"EMO 1:1", "EMO 3:4", "Emoji"}
    expected = {"EMO 1:1": (512, 512, True), "EMO 3:4": (512, 704, True), "Emoji": (512, 512, False)}
    for label, path in videos.items():
        assert path.is_relative_to(tmp_path / "output"), path
        codec, width, height, frames, sound = decoded(path)
        assert (codec, width, height, sound) == ("h264", *expected[label]), label
        assert frames >= 15, label  # at least a second of 15 fps actually decodes
    # Still marked as what they are.
    assert out.count("[sandbox]") >= 9 and "labelled SANDBOX" in out
    assert "Open one with: " in out and "dashscope-emo-mcp demo --open" in out


@pytest.mark.anyio
async def test_demo_open_hands_each_video_to_the_viewer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    opened: list[Path] = []

    def viewer(path: Path) -> None:
        opened.append(path)

    assert await run_demo(open_videos=True, opener=viewer, verb="xdg-open") == 0
    out = capsys.readouterr().out
    assert opened == list(demo_videos(out).values()) and len(opened) == 3
    assert all(path.is_file() for path in opened) and "Opened 3 videos with xdg-open." in out

    assert await run_demo(open_videos=True, opener=None, verb="xdg-open") == 0
    assert "No viewer found (xdg-open is not on PATH)" in capsys.readouterr().out


def test_the_platform_viewer_is_the_usual_one(tmp_path: Path) -> None:
    log = tmp_path / "opened.txt"
    viewer = tmp_path / "xdg-open"
    viewer.write_text(f'#!/bin/sh\nprintf "%s" "$1" > {log}\n')
    viewer.chmod(0o755)
    opener, verb = platform_opener("linux", which=lambda name: str(viewer) if name == "xdg-open" else None)
    assert verb == "xdg-open" and opener is not None
    launched = opener(tmp_path / "video.mp4")
    assert isinstance(launched, subprocess.Popen)
    assert launched.wait(timeout=30) == 0
    assert log.read_text() == str(tmp_path / "video.mp4")
    asked: list[str] = []

    def nothing_found(name: str) -> None:
        asked.append(name)

    assert platform_opener("darwin", which=nothing_found) == (None, "open")
    assert asked == ["open"]
    assert platform_opener("linux", which=lambda _: None) == (None, "xdg-open")


@pytest.mark.anyio
async def test_serve_reads_local_files_only_inside_the_allowed_root_folders(
    fake: FakeDashScope, tmp_path: Path
) -> None:
    inside, outside = tmp_path / "pictures", tmp_path / "elsewhere"
    portrait = media_files.image(inside / "me.png")
    stranger = media_files.image(outside / "them.png")
    # As an MCP Bundle host passes it: several folders after one flag, and an unfilled placeholder.
    args = ["-m", "server", "serve", "--allowed-root", str(inside), str(tmp_path / "voices")]
    args.append("${user_config.allowed_roots}")
    (tmp_path / "voices").mkdir()
    params = StdioServerParameters(command=sys.executable, args=args, env=make_env(fake, tmp_path), cwd=str(tmp_path))
    with anyio.fail_after(60):
        async with Client(params) as client:
            accepted = await client.call_tool("emo_detect", {"image_url": str(portrait)})
            assert not accepted.is_error, text_of(accepted)
            refused = await client.call_tool("emo_detect", {"image_url": str(stranger)})
            assert refused.is_error and str(inside) in text_of(refused) and str(tmp_path / "voices") in text_of(refused)
    assert len([r for r in fake.requests if r.path == "/oss-upload"]) == 1


def test_allowed_root_goes_with_serve() -> None:
    from server.cli.main import _parser

    args = _parser().parse_args(["serve", "--allowed-root", "a", "b", "--allowed-root", "c", "--sandbox"])
    assert args.allowed_root == ["a", "b", "c"] and args.sandbox is True
    assert _parser().parse_args(["serve", "--allowed-root"]).allowed_root == []
    assert _parser().parse_args([]).allowed_root == []
