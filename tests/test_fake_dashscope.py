"""Direct HTTP tests of the loopback DashScope fake: the rest of the suite trusts it as the upstream."""

from __future__ import annotations

import base64
import gzip
import hashlib
from typing import Any

import httpx2
import pytest

from server.config import SANDBOX_API_KEY
from server.sandbox.fake_dashscope import BOMB_BYTES, FakeDashScope, detect_boxes

AUTH = {"Authorization": f"Bearer {SANDBOX_API_KEY}"}
ASYNC = {**AUTH, "X-DashScope-Async": "enable"}
DETECT = "/services/aigc/image2video/face-detect"
SYNTH = "/services/aigc/image2video/video-synthesis"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def emo_detect(url: str, ratio: str = "1:1") -> dict[str, Any]:
    return {"model": "emo-detect-v1", "input": {"image_url": url}, "parameters": {"ratio": ratio}}


async def detect_and_submit_emo(client: httpx2.AsyncClient, base: str, image: str, audio: str) -> str:
    out = (await client.post(base + DETECT, json=emo_detect(image), headers=AUTH)).json()["output"]
    body = {
        "model": "emo-v1",
        "input": {"image_url": image, "audio_url": audio, "face_bbox": out["face_bbox"], "ext_bbox": out["ext_bbox"]},
        "parameters": {"style_level": "calm"},
    }
    r = await client.post(base + SYNTH, json=body, headers=ASYNC)
    assert r.status_code == 200, r.text
    task_id: str = r.json()["output"]["task_id"]
    return task_id


def test_boxes_are_nested_and_keep_the_ratio() -> None:
    for i in range(300):
        digest = hashlib.sha256(str(i).encode()).digest()
        for ratio, scale in (("1:1", 2.5), ("3:4", 2.2)):
            face, ext = detect_boxes(digest, ratio, scale)
            assert 0 <= face[0] < face[2] and 0 <= face[1] < face[3]
            assert ext[0] <= face[0] and ext[1] <= face[1] and face[2] <= ext[2] and face[3] <= ext[3]
            assert ext[0] >= 0 and ext[1] >= 0 and ext[2] <= 1000 and ext[3] <= 1200
            w, h = ext[2] - ext[0], ext[3] - ext[1]
            assert (w == h) if ratio == "1:1" else (4 * w == 3 * h)


@pytest.mark.anyio
async def test_auth_and_async_header_rules() -> None:
    fake = FakeDashScope()
    async with fake.serve() as base, httpx2.AsyncClient() as client:
        r = await client.get(base + "/tasks/x", headers={"Authorization": "Bearer sk-wrong"})
        assert r.status_code == 401
        assert r.json()["code"] == "InvalidApiKey" and r.json()["request_id"]
        r = await client.post(base + DETECT, json=emo_detect("https://x/a.jpg"), headers=ASYNC)
        assert (r.status_code, r.json()["code"]) == (403, "AccessDenied")
        assert "asynchronous" in r.json()["message"]
        r = await client.post(base + SYNTH, json={"model": "emo-v1", "input": {}}, headers=AUTH)
        assert (r.status_code, r.json()["code"]) == (403, "AccessDenied")
        assert "synchronous calls" in r.json()["message"]
        r = await client.post(
            base + DETECT, json={**emo_detect("https://x/a.jpg"), "model": "emo-v1-detect"}, headers=AUTH
        )
        assert (r.status_code, r.json()["code"]) == (404, "ModelNotFound")
    assert fake.requests[0].path == "/api/v1/tasks/x"


@pytest.mark.anyio
async def test_emo_detect_pass_and_scenarios() -> None:
    fake = FakeDashScope()
    async with fake.serve() as base, httpx2.AsyncClient() as client:
        r = await client.post(base + DETECT, json=emo_detect("https://x/a.jpg", "3:4"), headers=AUTH)
        body = r.json()
        assert r.status_code == 200 and body["usage"] == {"image_count": 1} and body["request_id"]
        out = body["output"]
        assert out["check_pass"] is True and out["humanoid"] is True
        x1, y1, x2, y2 = out["ext_bbox"]
        assert 4 * (x2 - x1) == 3 * (y2 - y1)
        again = await client.post(base + DETECT, json=emo_detect("https://x/a.jpg", "3:4"), headers=AUTH)
        other = await client.post(base + DETECT, json=emo_detect("https://x/b.jpg", "3:4"), headers=AUTH)
        assert again.json()["output"] == out != other.json()["output"]

        r = await client.post(base + DETECT, json=emo_detect("https://x/NoFace.jpg"), headers=AUTH)
        assert r.status_code == 200
        assert r.json()["output"]["check_pass"] is False
        assert r.json()["output"]["code"] == "InvalidFile.NoHuman"
        emoji = {"model": "emoji-detect-v1", "input": {"image_url": "https://x/noface.png"}}
        r = await client.post(base + DETECT, json=emoji, headers=AUTH)
        assert r.status_code == 200 and r.json()["output"]["code"] == "InvalidFile.FacePose"
        assert "bbox_face" not in r.json()["output"]
        r = await client.post(base + DETECT, json=emo_detect("https://x/multiface.jpg"), headers=AUTH)
        assert (r.status_code, r.json()["code"]) == (400, "InvalidFile.MultiHuman")


@pytest.mark.anyio
async def test_emoji_generate_uses_strict_wire_names() -> None:
    fake = FakeDashScope()
    async with fake.serve() as base, httpx2.AsyncClient() as client:
        det = {"model": "emoji-detect-v1", "input": {"image_url": "https://x/e.jpg"}, "parameters": {"ratio": "1:1"}}
        out = (await client.post(base + DETECT, json=det, headers=AUTH)).json()["output"]
        inp = {"image_url": "https://x/e.jpg", "driven_id": "mengwa_kaixin"}
        inp |= {"face_bbox": out["bbox_face"], "ext_bbox": out["ext_bbox_face"]}
        bad = {"model": "emoji-v1", "input": inp, "parameters": {}}
        r = await client.post(base + SYNTH, json=bad, headers=ASYNC)
        assert (r.status_code, r.json()["code"]) == (400, "InvalidParameter")
        assert "parameters" in r.json()["message"]
        r = await client.post(
            base + SYNTH, json={"model": "emoji-v1", "input": {**inp, "template_id": "x"}}, headers=ASYNC
        )
        assert r.status_code == 400 and "template_id" in r.json()["message"]
        moved = {**inp, "face_bbox": [b + 1 for b in out["bbox_face"]]}
        r = await client.post(base + SYNTH, json={"model": "emoji-v1", "input": moved}, headers=ASYNC)
        assert r.status_code == 400 and "do not match" in r.json()["message"]
        r = await client.post(base + SYNTH, json={"model": "emoji-v1", "input": inp}, headers=ASYNC)
        assert r.status_code == 200 and r.json()["output"]["task_status"] == "PENDING"
    assert len(fake.submits()) == 4 and len(fake.tasks) == 1


@pytest.mark.anyio
async def test_task_progression_and_download() -> None:
    fake = FakeDashScope(polls_to_finish=3, video_size=200_000)
    async with fake.serve() as base, httpx2.AsyncClient() as client:
        task_id = await detect_and_submit_emo(client, base, "https://x/p.jpg", "https://x/v.mp3")
        seen = []
        for _ in range(4):
            body = (await client.get(f"{base}/tasks/{task_id}", headers=AUTH)).json()
            seen.append(body["output"]["task_status"])
        assert seen == ["PENDING", "RUNNING", "SUCCEEDED", "SUCCEEDED"]
        out = body["output"]
        assert out["submit_time"] <= out["scheduled_time"] <= out["end_time"]
        assert len(out["end_time"]) == len("2025-09-11 14:33:38.716")
        assert body["usage"] == {"video_duration": 5.2, "video_ratio": "1:1"}
        r = await client.get(out["results"]["video_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        assert r.headers["content-length"] == "200000" and r.content[4:8] == b"ftyp"
        assert hashlib.sha256(r.content).hexdigest() == fake.video_sha256(task_id)
        assert fake.tasks[task_id].query_count == 4 and len(fake.queries(task_id)) == 4

        failing = await detect_and_submit_emo(client, base, "https://x/p.jpg", "https://x/failtask.mp3")
        fake.set_status(failing, "RUNNING")
        for _ in range(3):
            body = (await client.get(f"{base}/tasks/{failing}", headers=AUTH)).json()
        assert body["output"]["task_status"] == "FAILED" and "usage" not in body
        assert body["output"]["code"] == "InternalError.Algo"
        assert (await client.get(f"{fake.origin}/files/{failing}.mp4")).status_code == 404

        r = await client.get(base + "/tasks/no-such-task", headers=AUTH)
        assert r.status_code == 200 and r.json()["output"]["task_status"] == "UNKNOWN"


@pytest.mark.anyio
async def test_inject_and_cancel_and_list() -> None:
    fake = FakeDashScope(auto_progress=False)
    async with fake.serve() as base, httpx2.AsyncClient() as client:
        fake.inject("GET", "/tasks/", status=429, headers={"Retry-After": "2"})
        r = await client.get(base + "/tasks/abc", headers=AUTH)
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert r.json()["code"].startswith("Throttling")
        assert (await client.get(base + "/tasks/abc", headers=AUTH)).status_code == 200

        fake.inject("POST", "/api/v1" + SYNTH, delay=1.0, passthrough=True)
        async with httpx2.AsyncClient(timeout=0.3) as impatient:
            with pytest.raises(httpx2.TimeoutException):
                await detect_and_submit_emo(impatient, base, "https://x/q.jpg", "https://x/q.mp3")
        (slow,) = fake.tasks  # the submit took effect though its answer never arrived

        kept = await detect_and_submit_emo(client, base, "https://x/q.jpg", "https://x/q.mp3")
        r = await client.post(f"{base}/tasks/{slow}/cancel", headers=AUTH)
        assert r.status_code == 200 and fake.tasks[slow].status == "CANCELED"
        r = await client.post(f"{base}/tasks/{slow}/cancel", headers=AUTH)
        assert r.json()["code"] == "UnsupportedOperation"

        r = await client.get(base + "/tasks", params={"model_name": "emo-v1", "page_size": 1}, headers=AUTH)
        page = r.json()
        assert (page["total"], page["total_page"], page["page_no"]) == (2, 2, 1)
        assert page["data"][0]["task_id"] == kept and isinstance(page["data"][0]["gmt_create"], int)
        r = await client.get(base + "/tasks", params={"status": "CANCELED"}, headers=AUTH)
        assert [t["task_id"] for t in r.json()["data"]] == [slow]


@pytest.mark.anyio
async def test_upload_flow_then_detect_and_generate_with_oss() -> None:
    fake = FakeDashScope()
    image = b"\x89PNG fake portrait bytes"
    resolve = {**AUTH, "X-DashScope-OssResourceResolve": "enable"}

    async def upload(client: httpx2.AsyncClient, base: str, model: str, name: str) -> tuple[int, str, int]:
        """Upload `image` for `model`; answers (status, key, status of a second upload of that key)."""
        r = await client.get(base + "/uploads", params={"action": "getPolicy", "model": model}, headers=AUTH)
        p = r.json()["data"]
        form = {
            "OSSAccessKeyId": p["oss_access_key_id"],
            "Signature": p["signature"],
            "policy": p["policy"],
            "key": f"{p['upload_dir']}/{name}",
            "x-oss-object-acl": p["x_oss_object_acl"],
            "x-oss-forbid-overwrite": p["x_oss_forbid_overwrite"],
            "success_action_status": "200",
        }
        first = await client.post(p["upload_host"], data=form, files={"file": (name, image)})
        assert first.content == b""
        again = await client.post(p["upload_host"], data=form, files={"file": (name, image)})
        return first.status_code, form["key"], again.status_code

    async with fake.serve() as base, httpx2.AsyncClient() as client:
        status, key, overwrite = await upload(client, base, "emo-detect-v1", "me.png")
        assert (status, overwrite) == (200, 403)  # x-oss-forbid-overwrite
        url = "oss://" + key
        assert fake.objects[key].data == image
        r = await client.post(base + DETECT, json=emo_detect(url), headers=AUTH)
        assert (r.status_code, r.json()["code"]) == (400, "InvalidParameter")
        r = await client.post(base + DETECT, json={**emo_detect(url), "model": "emoji-detect-v1"}, headers=resolve)
        assert (r.status_code, r.json()["code"]) == (400, "InvalidURL")
        r = await client.post(base + DETECT, json=emo_detect(url), headers=resolve)
        assert r.status_code == 200 and r.json()["output"]["check_pass"] is True
        boxes = r.json()["output"]

        _, gen_key, _ = await upload(client, base, "emo-v1", "me.png")
        inp = {"image_url": "oss://" + gen_key, "audio_url": "https://x/a.wav"}
        inp |= {"face_bbox": boxes["face_bbox"], "ext_bbox": boxes["ext_bbox"]}
        r = await client.post(base + SYNTH, json={"model": "emo-v1", "input": inp}, headers={**resolve, **ASYNC})
        assert r.status_code == 200, r.text
    assert fake.requests[1].body["file"] == image


def test_serve_in_thread() -> None:
    fake = FakeDashScope()
    with fake.serve_in_thread() as base, httpx2.Client() as client:
        assert client.get(base + "/tasks/x", headers=AUTH).json()["output"]["task_status"] == "UNKNOWN"
    assert fake.queries("x")[0].headers["authorization"] == AUTH["Authorization"]


@pytest.mark.anyio
async def test_fault_layer_answers_as_each_kind_says() -> None:
    """The fault suite trusts these answers: each kind is checked on the wire, not through the product."""
    fake = FakeDashScope(polls_to_finish=1)
    async with fake.serve() as base, httpx2.AsyncClient() as client:
        task_id = await detect_and_submit_emo(client, base, "https://x/a.jpg", "https://x/a.wav")
        assert (await client.get(base + f"/tasks/{task_id}", headers=AUTH)).json()["output"][
            "task_status"
        ] == "SUCCEEDED"
        video = f"{fake.origin}/files/{task_id}.mp4"
        whole = (await client.get(video)).content
        md5 = hashlib.md5(whole, usedforsecurity=False).digest()
        assert base64.b64decode((await client.get(video)).headers["content-md5"]) == md5

        fake.fault("download", "redirect_private")
        r = await client.get(video)
        assert r.status_code == 302 and r.headers["location"] == f"http://10.0.0.1/files/{task_id}.mp4"
        fake.fault("download", "redirect_loop")
        assert (await client.get(video)).headers["location"] == video
        fake.fault("download", "truncated")
        r = await client.get(video)
        assert r.content == whole[: len(whole) // 2]  # a complete message, but not the object its MD5 names
        assert base64.b64decode(r.headers["content-md5"]) == md5
        fake.fault("download", "length_lie")
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(video)
        fake.fault("task_query", "bomb")
        async with client.stream("GET", base + f"/tasks/{task_id}", headers=AUTH) as streamed:
            raw = b"".join([piece async for piece in streamed.aiter_raw()])
        assert streamed.headers["content-encoding"] == "gzip" and len(raw) < 128 * 1024
        assert len(gzip.decompress(raw)) == BOMB_BYTES
        fake.fault("task_query", "bad_encoding")
        with pytest.raises(httpx2.DecodingError):
            await client.get(base + f"/tasks/{task_id}", headers=AUTH)
        fake.fault("task_query", "stall", seconds=5)
        with pytest.raises(httpx2.ReadTimeout):
            await client.get(base + f"/tasks/{task_id}", headers=AUTH, timeout=httpx2.Timeout(0.3))

        # Before the fake acts nothing happens; after, the effect stays although the answer is lost.
        before = len(fake.tasks)
        fake.fault("submit", "status", status=500)
        fake.fault("submit", "html", after=True)
        out = (await client.post(base + DETECT, json=emo_detect("https://x/b.jpg"), headers=AUTH)).json()["output"]
        body = {
            "model": "emo-v1",
            "input": {"image_url": "https://x/b.jpg", "audio_url": "https://x/b.wav", **{
                k: out[k] for k in ("face_bbox", "ext_bbox")
            }},
        }  # fmt: skip
        assert (await client.post(base + SYNTH, json=body, headers=ASYNC)).status_code == 500
        assert len(fake.tasks) == before
        r = await client.post(base + SYNTH, json=body, headers=ASYNC)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert len(fake.tasks) == before + 1
        assert not fake.faults.pending()
    assert fake.faults.served[-2:] == [("submit", "status"), ("submit", "html")]
    assert not [r for r in fake.requests if "10.0.0.1" in r.headers.get("host", "")]
