"""A local file swapped after it was checked: nothing outside the roots is opened, sent or shown.

Two windows, each made deterministic: between the check and the open (`before_open`, the hook
`resolve_local` offers for this), and between the read and every later use (pre-flight, upload,
viewer), which must work on the bytes that were read and hashed, never on the path again.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.domain.uploads import Uploads
from server.errors import RefusedInputError
from server.media.preflight import Checked, Preflight
from server.media.preview import local_image
from server.media.sources import resolve_local
from server.sandbox.fake_dashscope import FakeDashScope
from server.store.ledger import Ledger
from server.upstream.client import DashScopeClient
from server.upstream.limits import Limits
from tests import media_files
from tests.conftest import TEST_KEY

pytestmark = pytest.mark.anyio


@pytest.fixture
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A portrait outside the roots, of other dimensions than the one inside."""
    return media_files.image(tmp_path_factory.mktemp("elsewhere") / "secret.png", (900, 500), color="#ff0000")


def swap_for_link(path: Path, target: Path) -> None:
    """What an attacker with write access to a folder inside the roots does between two steps."""
    path.unlink()
    path.symlink_to(target)


def test_a_file_swapped_for_a_link_between_check_and_open_is_refused(tmp_path: Path, secret: Path) -> None:
    portrait = media_files.image(tmp_path / "portrait.png", (600, 700))
    with pytest.raises(RefusedInputError, match="changed while it was being opened") as refused:
        resolve_local("image_url", str(portrait), (tmp_path,), before_open=lambda _: swap_for_link(portrait, secret))
    assert "EMO_MCP_ALLOWED_ROOTS" in str(refused.value)
    assert portrait.is_symlink()  # the swap happened, and the link was not followed


def test_a_folder_swapped_for_a_link_between_check_and_open_is_refused(tmp_path: Path, secret: Path) -> None:
    portrait = media_files.image(tmp_path / "people" / "portrait.png", (600, 700))
    (secret.parent / "portrait.png").write_bytes(secret.read_bytes())

    def swap_folder(_: Path) -> None:
        os.rename(tmp_path / "people", tmp_path / "people.old")
        (tmp_path / "people").symlink_to(secret.parent, target_is_directory=True)

    with pytest.raises(RefusedInputError, match="changed while it was being opened"):
        resolve_local("image_url", str(portrait), (tmp_path,), before_open=swap_folder)


async def test_what_is_checked_uploaded_and_shown_is_what_was_hashed(
    fake: FakeDashScope, tmp_path: Path, secret: Path
) -> None:
    portrait = media_files.image(tmp_path / "portrait.png", (600, 700))
    original = portrait.read_bytes()
    ref = resolve_local("image_url", str(portrait), (tmp_path,))
    swap_for_link(portrait, secret)  # after the read: every later step must ignore the path

    checked = Checked()
    await Preflight(remote=False).image(ref, "emo", "image_url", checked)
    assert checked.image is not None and (checked.image.width, checked.image.height) == (600, 700)

    ledger = Ledger(tmp_path)
    async with DashScopeClient(None, fake.base_url, TEST_KEY, limits=Limits(20.0, {})) as client:
        url = await Uploads(client, ledger).url_for(ref, "emo-detect-v1")
    ledger.close()
    stored = fake.objects[url.removeprefix("oss://")]
    assert stored.data == original and stored.sha256 == ref.sha256
    assert stored.data != secret.read_bytes()

    assert local_image(ref).data == original
