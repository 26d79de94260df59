"""Provenance: generation only accepts boxes that a passing detection of that same image returned.

This is the rule that makes the server strict by design: an agent cannot invent a bounding box,
reuse one from another image, or carry one across model families. Each refusal names the tool
to call first.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.errors import ProvenanceError
from server.models import Family
from server.store.ledger import Detection, Ledger

_DETECT_TOOL: dict[Family, str] = {"emo": "emo_detect", "emoji": "emoji_detect"}
_EXT_NAME: dict[Family, str] = {"emo": "ext_bbox", "emoji": "ext_bbox_face"}


def require_detection(
    ledger: Ledger,
    family: Family,
    image_url: str,
    face_bbox: Sequence[int],
    ext_bbox: Sequence[int],
) -> Detection:
    """Return the passing detection that produced exactly these boxes, or refuse with a next step."""
    detect_tool, ext_name, generate_tool = _DETECT_TOOL[family], _EXT_NAME[family], f"{family}_generate"
    face, ext = list(face_bbox), list(ext_bbox)
    of_image = ledger.detections_of(image_url)
    mine = [d for d in of_image if d.family == family]
    passing = [d for d in mine if d.check_pass]

    for detection in passing:
        if detection.face_bbox == face and detection.ext_bbox == ext:
            return detection

    if passing:
        latest = passing[0]
        raise ProvenanceError(
            f"face_bbox {face} / {ext_name} {ext} are not the boxes {detect_tool} returned for this "
            f"image_url (it returned face_bbox {latest.face_bbox}, {ext_name} {latest.ext_bbox}). "
            f"Pass the boxes from {detect_tool} unchanged, or call {detect_tool} again."
        )
    if mine:
        latest = mine[0]
        raise ProvenanceError(
            f"{detect_tool} of this image_url did not pass ({latest.code}: {latest.message}), so "
            f"{generate_tool} cannot use it. Choose another portrait and call {detect_tool} on it first."
        )
    other = [d for d in of_image if d.family != family and d.check_pass]
    if other:
        other_tool = _DETECT_TOOL[other[0].family]  # type: ignore[index]
        raise ProvenanceError(
            f"This image_url was only checked by {other_tool}; its boxes are not valid for "
            f"{generate_tool}. Call {detect_tool} with this image_url first and pass its boxes unchanged."
        )
    raise ProvenanceError(
        f"No passing {detect_tool} of this exact image_url is on record, so these boxes cannot be "
        f"trusted. Call {detect_tool} with this image_url first, then pass its face_bbox and "
        f"{ext_name} unchanged to {generate_tool}."
    )
