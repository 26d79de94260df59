"""The upload cache: which content (sha256) already has a fresh `oss://` copy for which model.

Kept in the ledger so every worker of a cluster reuses one upload (the table is the baseline
migration's); `server.domain.uploads` decides when to upload and for how long a copy is usable.
"""

from __future__ import annotations

from server.store.ledger import Ledger


class UploadCache:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def fresh(self, sha256: str, model: str, until: float) -> str | None:
        """The oss:// URL of this content for this model that is still valid at `until`, if any."""
        rows = self._ledger.query(
            "SELECT oss_url FROM uploads WHERE sha256 = ? AND model = ? AND expires_at > ?", (sha256, model, until)
        )
        return str(rows[0]["oss_url"]) if rows else None

    def record(
        self, sha256: str, model: str, oss_url: str, local_path: str, uploaded_at: float, expires_at: float
    ) -> None:
        """The newest upload wins (two workers uploading the same file at once both succeed)."""
        self._ledger.execute(
            "INSERT INTO uploads (sha256, model, oss_url, local_path, uploaded_at, expires_at) VALUES (?,?,?,?,?,?)"
            " ON CONFLICT (sha256, model) DO UPDATE SET oss_url = excluded.oss_url, local_path = excluded.local_path,"
            " uploaded_at = excluded.uploaded_at, expires_at = excluded.expires_at",
            (sha256, model, oss_url, local_path, uploaded_at, expires_at),
        )
