"""Local files to DashScope's temporary storage (`oss://`), as the contract describes.

1. `GET /uploads?action=getPolicy&model=<model>` gives a form policy for that model;
2. a multipart POST to its `upload_host` stores the file under `upload_dir/<unique name>`;
3. `oss://<key>` is usable for 48 h, only with that model and the resolve header (sent by
   `server/upstream/client.py`). So an image is uploaded once for the detect model and once for the
   generate model. Uploads are cached by (content sha256, model) in the ledger until
   shortly before they expire, so repeated calls do not upload again.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from server.errors import RefusedInputError, ServiceError
from server.media.sources import MediaRef
from server.store.ledger import Ledger
from server.store.uploads import UploadCache
from server.upstream.client import DashScopeClient

logger = logging.getLogger(__name__)

OSS_LIFETIME_SECONDS = 48 * 3600
# Reuse an upload only while it has this much life left: a queued task may fetch it hours later.
REUSE_MARGIN_SECONDS = 4 * 3600

_POLICY_FIELDS = ("policy", "signature", "upload_dir", "upload_host", "oss_access_key_id")


def object_name(path: Path) -> str:
    """A unique name (overwrite is forbidden upstream) that keeps a tidy extension."""
    suffix = path.suffix.lower()
    suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""
    return f"{uuid.uuid4().hex}{suffix}"


MB = 1024 * 1024


def _policy_limit_mb(policy: Mapping[str, object]) -> float | None:
    """The policy's own `max_file_size_mb`, when it states a usable one."""
    value = policy.get("max_file_size_mb")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        limit = float(value)
    except ValueError:
        return None
    return limit if limit > 0 else None


class Uploads:
    def __init__(self, client: DashScopeClient, ledger: Ledger) -> None:
        self._client = client
        self._cache = UploadCache(ledger)

    def cached(self, sha256: str, model: str, now: float | None = None) -> str | None:
        """The oss:// URL of an earlier upload of this content for this model, while still fresh."""
        now = time.time() if now is None else now
        return self._cache.fresh(sha256, model, now + REUSE_MARGIN_SECONDS)

    async def url_for(self, ref: MediaRef, model: str) -> str:
        """The oss:// URL of a local file for `model`: cached, or uploaded now."""
        assert ref.path is not None and ref.sha256 is not None
        cached = self.cached(ref.sha256, model)
        if cached:
            return cached
        policy = await self._client.upload_policy(model)
        missing = [name for name in _POLICY_FIELDS if not isinstance(policy.get(name), str) or not policy[name]]
        if missing:
            raise ServiceError(200, "BadResponse", f"The upload policy lacks {', '.join(missing)}")
        key = f"{str(policy['upload_dir']).rstrip('/')}/{object_name(ref.path)}"
        fields = {
            "OSSAccessKeyId": str(policy["oss_access_key_id"]),
            "Signature": str(policy["signature"]),
            "policy": str(policy["policy"]),
            "key": key,
            "x-oss-object-acl": str(policy.get("x_oss_object_acl") or "private"),
            "x-oss-forbid-overwrite": str(policy.get("x_oss_forbid_overwrite") or "true"),
            "success_action_status": "200",
        }
        path = ref.path
        # The bytes read (and hashed) when the file was confined: the path is not read again, so what is
        # uploaded is what provenance matched and pre-flight checked, whatever happened to the path since.
        content = ref.data
        if content is None or hashlib.sha256(content).hexdigest() != ref.sha256:
            raise RefusedInputError(f"{path} was not read when it was checked; call again. Nothing was uploaded.")
        limit_mb = _policy_limit_mb(policy)
        if limit_mb is not None and len(content) > limit_mb * MB:
            raise RefusedInputError(
                f"{path} is {len(content) / MB:.1f} MB; DashScope's temporary storage takes at most {limit_mb:g} MB "
                f"per file for {model}. Use a smaller file, or a public URL. Nothing was uploaded or billed."
            )
        uploaded_at = time.time()
        await self._client.upload_form(str(policy["upload_host"]), fields, path.name, content)
        url = "oss://" + key
        self._cache.record(ref.sha256, model, url, str(path), uploaded_at, uploaded_at + OSS_LIFETIME_SECONDS)
        logger.info("uploaded %s for %s (%d bytes)", path, model, len(content))
        return url
