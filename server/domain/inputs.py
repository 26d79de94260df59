"""The caller's inputs, made ready for DashScope: model names, media, pre-flight, uploads, provenance.

Detection and generation both start here, so a rule about an input (which model name is allowed,
which file may be read, how a local file reaches DashScope) is written once.
"""

from __future__ import annotations

import anyio

from server.config import Settings
from server.domain.provenance import require_detection
from server.domain.uploads import Uploads
from server.errors import MissingApiKeyError, ProvenanceError, RefusedInputError
from server.media.preflight import Checked, Preflight, local_limit
from server.media.sources import MediaRef, is_remote, resolve_media
from server.models import Family
from server.store.evidence import Evidence
from server.store.ledger import Detection, Ledger


def resolve_model(settings: Settings, official: str, requested: str | None) -> str:
    """The wire model name: the official one, or a deployment name configured for it.

    Every entry point calls this first, so it is also where a missing key is reported.
    """
    if not settings.api_key:
        raise MissingApiKeyError()
    if requested is None or requested == official:
        return official
    if requested in settings.model_aliases.get(official, ()):
        return requested
    allowed = [official, *settings.model_aliases.get(official, ())]
    raise RefusedInputError(f"model {requested!r} is not allowed here; use one of {allowed}.")


class Inputs:
    """Media references, their free checks and their wire URLs, and the provenance of boxes."""

    def __init__(self, settings: Settings, ledger: Ledger, evidence: Evidence, uploads: Uploads, preflight: Preflight):
        self.settings = settings
        self.ledger = ledger
        self.evidence = evidence
        self.uploads = uploads
        self.preflight = preflight

    async def media(self, name: str, value: str) -> MediaRef:
        """A URL as given, or a local file confined to the roots and read once (bounded by its kind)."""
        roots = self.settings.allowed_roots
        if is_remote(value):  # nothing to read from disk: no worker-thread hop
            return resolve_media(name, value, roots)
        limit = local_limit(name)
        return await anyio.to_thread.run_sync(lambda: resolve_media(name, value, roots, max_bytes=limit))

    async def checked_image(self, image_url: str, family: Family) -> tuple[MediaRef, Checked]:
        image = await self.media("image_url", image_url)
        checked = Checked()
        await self.preflight.image(image, family, "image_url", checked)
        return image, checked

    @staticmethod
    def local_note(image: MediaRef) -> dict[str, str | None] | None:
        """What the evidence keeps (`local-files.json`) to name the local file behind an opaque oss:// key."""
        if image.path is None:
            return None
        return {"image_url": str(image.path), "sha256": image.sha256}

    async def wire_url(self, ref: MediaRef, model: str) -> str:
        """What DashScope receives: the URL itself, or the local file's oss:// upload for `model`."""
        if ref.url is not None:
            return ref.url
        return await self.uploads.url_for(ref, model)

    def provenance(self, family: Family, image: MediaRef, face: list[int], ext: list[int]) -> Detection:
        try:
            return require_detection(self.ledger, family, image.identity, face, ext)
        except ProvenanceError as exc:
            if not image.is_local:
                raise
            raise ProvenanceError(
                f"{exc} (The local file {image.shown} is matched by its content: if it changed since it was "
                "detected, detect it again.)"
            ) from exc
