"""A detection's evidence folder comes from a spare made while the loop is idle: same layout, same
modes, nothing left behind (server/store/evidence.py)."""

from __future__ import annotations

import gc
import json
import stat
from pathlib import Path

import anyio
import pytest

from server.store import evidence as evidence_module
from server.store.evidence import Evidence, encode


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.anyio
async def test_detections_take_spares_with_the_same_layout_and_modes(tmp_path: Path) -> None:
    evidence = Evidence(tmp_path, "sk-test-0000000000")
    folders = []
    for number in range(4):
        opened = evidence.open_detection("emo", {"request.json": encode({"n": number})}, "response.json")
        opened.fill({"answer": number})
        folders.append(opened.folder)
        await anyio.sleep(evidence_module.SPARE_DELAY * 3)  # the loop idles: spares are made
    day = folders[0].parent
    spares = [entry for entry in day.iterdir() if entry.name.startswith(".spare-")]
    assert len(spares) == evidence_module.SPARES
    for number, folder in enumerate(folders):
        assert folder.parent == day and not folder.name.startswith(".")
        assert sorted(entry.name for entry in folder.iterdir()) == ["request.json", "response.json"]
        assert json.loads((folder / "request.json").read_text()) == {"n": number}
        assert json.loads((folder / "response.json").read_text()) == {"answer": number}
        assert _mode(folder) == 0o700
        assert {_mode(entry) for entry in folder.iterdir()} == {0o600}
    assert {_mode(spare) for spare in spares} == {0o700}
    del evidence, opened
    gc.collect()  # a closing server (or the interpreter's exit) removes its spares
    assert not [entry for entry in day.iterdir() if entry.name.startswith(".spare-")]


@pytest.mark.anyio
async def test_a_spare_removed_by_hand_is_replaced_by_a_folder_made_on_the_spot(tmp_path: Path) -> None:
    evidence = Evidence(tmp_path, None)
    evidence.open_detection("emoji", {}, "response.json").drop()
    await anyio.sleep(evidence_module.SPARE_DELAY * 3)
    day = next((tmp_path / "aliyun-emoji" / "detect").iterdir())
    for spare in day.glob(".spare-*"):
        for entry in spare.iterdir():
            entry.unlink()
        spare.rmdir()
    opened = evidence.open_detection("emoji", {"request.json": encode({})}, "response.json")
    opened.fill({"ok": True})
    assert (opened.folder / "request.json").is_file() and (opened.folder / "response.json").is_file()


def test_without_an_event_loop_no_spare_is_made(tmp_path: Path) -> None:
    evidence = Evidence(tmp_path, None)
    evidence.open_detection("emo", {"request.json": encode({})}, "response.json").fill({})
    day = next((tmp_path / "aliyun-emo" / "detect").iterdir())
    assert [entry.name for entry in day.iterdir() if entry.name.startswith(".")] == []
