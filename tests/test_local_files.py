"""Local files: confined to the allowed roots, checked for free, uploaded to temporary storage per model.

The fake checks the policy call, the multipart form, the oss:// URL and the resolve header; these
tests check what it received and that provenance follows a local file's content.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from server.app import create_app
from server.config import load_settings
from server.errors import ConfigError
from server.sandbox.fake_dashscope import FakeDashScope, RecordedRequest
from tests import media_files
from tests.conftest import TEST_KEY, call_error, call_ok, make_env, read_json

pytestmark = pytest.mark.anyio


def uploads(fake: FakeDashScope) -> list[RecordedRequest]:
    return [r for r in fake.requests if r.path == "/oss-upload"]


def policy_calls(fake: FakeDashScope) -> list[RecordedRequest]:
    return [r for r in fake.requests if r.path.rstrip("/") == "/api/v1/uploads"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_uploaded(fake: FakeDashScope, url: str, model: str, source: Path) -> None:
    assert url.startswith("oss://")
    stored = fake.objects[url.removeprefix("oss://")]
    assert stored.model == model
    assert stored.sha256 == sha256(source)


async def test_emo_chain_with_local_image_and_audio(client: Client, fake: FakeDashScope, tmp_path: Path) -> None:
    portrait = media_files.image(tmp_path / "media" / "portrait.png", (640, 800))
    speech = media_files.wav(tmp_path / "media" / "speech.wav", seconds=5)

    detection = await call_ok(client, "emo_detect", {"image_url": "media/portrait.png"})
    assert detection["check_pass"] is True
    assert detection["image_url"] == str(portrait)  # the local path, not the oss:// key

    [policy] = policy_calls(fake)
    assert policy.method == "GET"
    assert policy.query == {"action": "getPolicy", "model": "emo-detect-v1"}
    assert policy.headers["authorization"] == f"Bearer {TEST_KEY}"
    [upload] = uploads(fake)
    form = upload.body
    assert isinstance(form, dict)
    assert list(form)[-1] == "file" and form["file"] == portrait.read_bytes()
    assert form["success_action_status"] == "200" and form["x-oss-forbid-overwrite"] == "true"
    assert str(form["key"]).endswith(".png")
    assert "authorization" not in upload.headers  # the storage host never sees the API key
    detect = next(r for r in fake.requests if r.path.endswith("/face-detect"))
    assert detect.body["input"]["image_url"] == "oss://" + str(form["key"])
    assert detect.headers["x-dashscope-ossresourceresolve"] == "enable"
    assert_uploaded(fake, detect.body["input"]["image_url"], "emo-detect-v1", portrait)

    # Same content again: the cached upload is reused.
    await call_ok(client, "emo_detect", {"image_url": str(portrait)})
    assert len(uploads(fake)) == 1

    submitted = await call_ok(
        client,
        "emo_generate",
        {
            "image_url": portrait.as_uri(),  # file:// URI of the same file: same content, same provenance
            "audio_url": str(speech),
            "face_bbox": detection["face_bbox"],
            "ext_bbox": detection["ext_bbox"],
        },
    )
    assert submitted["estimated_cost_cny"] == pytest.approx(5 * 0.08)
    assert "read from the file" in submitted["estimate_basis"]
    [submit] = fake.submits()
    assert submit.headers["x-dashscope-ossresourceresolve"] == "enable"
    # Files are bound to one model: both were uploaded again, for emo-v1.
    assert_uploaded(fake, submit.body["input"]["image_url"], "emo-v1", portrait)
    assert_uploaded(fake, submit.body["input"]["audio_url"], "emo-v1", speech)
    assert [r.query["model"] for r in policy_calls(fake)] == ["emo-detect-v1", "emo-v1", "emo-v1"]
    assert submitted["inputs"] == {"image_url": str(portrait), "audio_url": str(speech)}
    local = read_json(Path(submitted["evidence_dir"]) / "local-files.json")
    assert local == {"image_url": str(portrait), "audio_url": str(speech)}
    assert read_json(Path(detection["evidence_dir"]) / "local-files.json")["sha256"] == sha256(portrait)

    status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 5})
    assert status["task_status"] == "SUCCEEDED"
    assert status["actual_cost_cny"] == pytest.approx(5.2 * 0.08)
    assert status["estimated_cost_cny"] == pytest.approx(0.4)


async def test_a_changed_local_file_needs_a_new_detection(client: Client, fake: FakeDashScope, tmp_path: Path) -> None:
    portrait = media_files.image(tmp_path / "portrait.jpg", (800, 800), fmt="JPEG")
    detection = await call_ok(client, "emoji_detect", {"image_url": str(portrait)})
    media_files.image(portrait, (800, 800), fmt="JPEG", color="#2040a0")  # same path, new content
    args = {
        "image_url": str(portrait),
        "face_bbox": detection["face_bbox"],
        "ext_bbox_face": detection["ext_bbox_face"],
        "template_id": "mengwa_kaixin",
    }
    message = await call_error(client, "emoji_generate", args)
    assert "Call emoji_detect" in message and "matched by its content" in message
    assert fake.submits() == []

    again = await call_ok(client, "emoji_detect", {"image_url": str(portrait)})
    submitted = await call_ok(
        client, "emoji_generate", {**args, "face_bbox": again["face_bbox"], "ext_bbox_face": again["ext_bbox_face"]}
    )
    assert submitted["task_status"] == "PENDING"
    [submit] = fake.submits()
    assert_uploaded(fake, submit.body["input"]["image_url"], "emoji-v1", portrait)
    assert submitted["estimated_cost_cny"] == pytest.approx(5 * 0.08)  # template bound x unconfirmed rate
    status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 5})
    assert status["actual_cost_cny"] == pytest.approx(3 * 0.08)


async def test_half_body_with_local_mp3_costs_the_3_4_rate(client: Client, fake: FakeDashScope, tmp_path: Path) -> None:
    portrait = media_files.image(tmp_path / "p.webp", (900, 1200), fmt="WEBP")
    speech = media_files.mp3(tmp_path / "speech.mp3", seconds=10)
    detection = await call_ok(client, "emo_detect", {"image_url": str(portrait), "ratio": "3:4"})
    submitted = await call_ok(
        client,
        "emo_generate",
        {
            "image_url": str(portrait),
            "audio_url": str(speech),
            "face_bbox": detection["face_bbox"],
            "ext_bbox": detection["ext_bbox"],
        },
    )
    assert submitted["estimated_cost_cny"] == pytest.approx(10 * 0.16, abs=0.01)
    status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 5})
    assert status["usage"]["video_ratio"] == "3:4"
    assert status["actual_cost_cny"] == pytest.approx(5.2 * 0.16)


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return media_files.image(tmp_path_factory.mktemp("elsewhere") / "secret.png")


async def test_paths_outside_the_roots_are_refused_before_anything_is_sent(
    client: Client, fake: FakeDashScope, tmp_path: Path, outside: Path
) -> None:
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "link.png").symlink_to(outside)
    cases = {
        str(outside): "outside the allowed roots",
        outside.as_uri(): "outside the allowed roots",
        "media/link.png": f"resolves to {outside}",
        "media/../../elsewhere/secret.png": "'..'",
        "media": "is a directory",
        "media/missing.png": "no file exists",
        "not a url": "no file exists",
    }
    for value, expected in cases.items():
        message = await call_error(client, "emo_detect", {"image_url": value})
        assert expected in message, message
        assert str(tmp_path) in message and "EMO_MCP_ALLOWED_ROOTS" in message
    assert fake.requests == []


async def test_a_device_is_refused(fake: FakeDashScope, tmp_path: Path) -> None:
    env = make_env(fake, tmp_path, EMO_MCP_ALLOWED_ROOTS=f"{tmp_path}:/dev")
    async with Client(create_app(load_settings(env, cwd=tmp_path))) as session:
        message = await call_error(session, "emo_detect", {"image_url": "/dev/null"})
    assert "not a regular file" in message and "/dev" in message
    assert fake.requests == []


async def test_images_that_break_a_limit_are_refused_for_free(
    client: Client, fake: FakeDashScope, tmp_path: Path
) -> None:
    small = media_files.image(tmp_path / "small.png", (300, 500))
    message = await call_error(client, "emo_detect", {"image_url": str(small)})
    assert "300x500" in message and "between 400 and 7000" in message

    text = tmp_path / "portrait.jpg"
    text.write_text("this is not a picture")
    message = await call_error(client, "emo_detect", {"image_url": str(text)})
    assert "not a JPEG, PNG, BMP or WEBP image by its content" in message

    gif = media_files.image(tmp_path / "anim.png", (500, 500), fmt="GIF")  # a GIF wearing a .png name
    message = await call_error(client, "emoji_detect", {"image_url": str(gif)})
    assert "by its content" in message

    big = media_files.image(tmp_path / "big.bmp", (2000, 2000), fmt="BMP")  # 12 MB uncompressed
    message = await call_error(client, "emoji_detect", {"image_url": str(big)})
    assert "at most 10 MB" in message
    assert fake.requests == []
    # The same 12 MB image is fine for EMO, which has no byte limit on images.
    assert (await call_ok(client, "emo_detect", {"image_url": str(big)}))["check_pass"] is True


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: media_files.wav(d / "long.wav", seconds=61), "lasts 61.0 s"),
        (lambda d: media_files.mp3(d / "long.mp3", seconds=61), "under 60 s"),
        (lambda d: media_files.wav(d / "huge.wav", seconds=16 * 1024 * 1024 / 8000), "16.0 MB"),
        (lambda d: media_files.image(d / "speech.wav", (500, 500)), "not WAV or MP3 by its content"),
    ],
    ids=["61s-wav", "61s-mp3", "16MB", "png-named-wav"],
)
async def test_audio_that_breaks_a_limit_is_refused_for_free(
    client: Client, fake: FakeDashScope, tmp_path: Path, make: Any, expected: str
) -> None:
    portrait = media_files.image(tmp_path / "portrait.png")
    detection = await call_ok(client, "emo_detect", {"image_url": str(portrait)})
    before = len(fake.requests)
    audio: Path = make(tmp_path)
    args = {
        "image_url": str(portrait),
        "audio_url": str(audio),
        "face_bbox": detection["face_bbox"],
        "ext_bbox": detection["ext_bbox"],
    }
    message = await call_error(client, "emo_generate", args)
    assert expected in message and "Nothing was sent" in message
    assert len(fake.requests) == before  # no upload, no submit


async def test_schema_still_refuses_other_schemes(client: Client, fake: FakeDashScope) -> None:
    for value in ("ftp://example.com/a.jpg", "//server/share/a.jpg", "file://otherhost/a.jpg", " a.jpg"):
        message = await call_error(client, "emo_detect", {"image_url": value})
        assert "image_url" in message
    assert fake.requests == []


async def test_uploads_are_cached_across_restarts(fake: FakeDashScope, tmp_path: Path) -> None:
    portrait = media_files.image(tmp_path / "portrait.png")
    settings = load_settings(make_env(fake, tmp_path), cwd=tmp_path)
    for _ in range(2):
        async with Client(create_app(settings)) as session:
            await call_ok(session, "emoji_detect", {"image_url": str(portrait)})
    assert len(uploads(fake)) == 1
    assert len(fake.detections) == 2


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EMO_MCP_ALLOWED_ROOTS", "/no/such/folder"),
        ("EMO_MCP_MAX_COST_CNY", "lots"),
        ("EMO_MCP_CONFIRM_ABOVE_CNY", "-1"),
        ("EMO_MCP_PRICE_EMO_1_1", "cheap"),
    ],
)
def test_bad_settings_stop_the_server_naming_the_variable(tmp_path: Path, variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings({"OUTPUT_DIR": str(tmp_path), variable: value}, cwd=tmp_path)


def test_allowed_roots_are_a_path_list(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env = {"OUTPUT_DIR": str(tmp_path), "EMO_MCP_ALLOWED_ROOTS": os.pathsep.join(["a", "b"])}
    assert load_settings(env, cwd=tmp_path).allowed_roots == (tmp_path / "a", tmp_path / "b")
    assert load_settings({"OUTPUT_DIR": str(tmp_path)}, cwd=tmp_path).allowed_roots == (tmp_path,)


@pytest.mark.parametrize(
    ("name", "tool", "expected"),
    [("huge.png", "emo_detect", "over the 100 MB"), ("huge.wav", "emo_generate", "over the 15 MB")],
    ids=["image", "audio"],
)
async def test_a_huge_sparse_file_is_refused_by_its_size_before_it_is_read(
    client: Client, fake: FakeDashScope, tmp_path: Path, name: str, tool: str, expected: str
) -> None:
    """2 GB that take no disk: a valid header, then a hole. Reading it would take 2 GB of memory."""
    portrait = media_files.image(tmp_path / "portrait.png")
    detection = await call_ok(client, "emo_detect", {"image_url": str(portrait)})
    before = len(fake.requests)
    huge = tmp_path / name
    if name.endswith(".png"):
        media_files.image(huge, (640, 800))
    else:
        media_files.wav(huge, seconds=1)
    os.truncate(huge, 2 * 1024**3)
    args = {"image_url": str(huge)}
    if tool == "emo_generate":
        args = {
            "image_url": str(portrait),
            "audio_url": str(huge),
            "face_bbox": detection["face_bbox"],
            "ext_bbox": detection["ext_bbox"],
        }
    message = await call_error(client, tool, args)
    assert "2048.0 MB" in message and expected in message, message
    assert "Nothing was sent; the file was not read" in message
    assert len(fake.requests) == before  # no upload policy, no upload, no paid call


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("file:///tmp/a%00b.png", "contains a NUL character"),
        ("file:///tmp/%ff.png", "percent-escapes are not UTF-8"),
        ("file:///tmp/a.png?x=1", "cannot carry a query"),
        ("file:///tmp/a.png#top", "cannot carry a query or a fragment"),
    ],
    ids=["nul", "not-utf8", "query", "fragment"],
)
async def test_a_bad_file_uri_is_refused_like_any_bad_path(
    client: Client, fake: FakeDashScope, value: str, expected: str
) -> None:
    message = await call_error(client, "emo_detect", {"image_url": value})
    assert expected in message and "EMO_MCP_ALLOWED_ROOTS" in message, message
    assert fake.requests == []
