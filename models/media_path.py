"""Where a frame lives on the media volume (edge-persistence.md, "PVC path conventions").

    {root}/{tenant}/{farm}/{barn}/{session_id}/{captured_at}_{media_id}.jpg
    {root}/{tenant}/{farm}/{barn}/monitoring/{device_id}/{captured_at}_{media_id}.jpg

`.png` for PNG frames; `captured_at` in UTC as `YYYYMMDDTHHMMSSmmmZ` (SPEC §1.4).

Pure: computes a path, touches nothing.
"""

import os
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

from models.ids import ID_PATTERN, ID_RE

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png"}


def captured_at_stamp(captured_at: datetime) -> str:
    """`20261127T100001250Z`: UTC, milliseconds (truncated), sortable."""
    if captured_at.tzinfo is None:
        raise ValueError("captured_at must be timezone-aware")
    utc = captured_at.astimezone(timezone.utc)
    return f"{utc:%Y%m%dT%H%M%S}{utc.microsecond // 1000:03d}Z"


def media_path(
    root: Path,
    *,
    tenant_id: str,
    farm_id: str,
    barn_id: str,
    device_id: str,
    session_id: UUID | None,
    captured_at: datetime,
    media_id: UUID,
    mime_type: str,
) -> Path:
    for name, value in (
        ("tenant_id", tenant_id),
        ("farm_id", farm_id),
        ("barn_id", barn_id),
        ("device_id", device_id),
    ):
        # Ids were validated at ingress; re-checked because they become paths.
        if ID_RE.fullmatch(value) is None:
            raise ValueError(f"{name} must match {ID_PATTERN}")
    try:
        extension = EXTENSIONS[mime_type]
    except KeyError:
        raise ValueError(f"unsupported mime type {mime_type!r}") from None
    # UUID(str(...)) also accepts ids read back as text, and refuses anything else.
    media_id = UUID(str(media_id))
    folder = (
        Path(root, tenant_id, farm_id, barn_id, str(UUID(str(session_id))))
        if session_id is not None
        else Path(root, tenant_id, farm_id, barn_id, "monitoring", device_id)
    )
    path = folder / f"{captured_at_stamp(captured_at)}_{media_id}.{extension}"
    # Defence in depth: lexical check only (no filesystem access, no symlinks).
    base = os.path.normpath(root)
    if os.path.commonpath([base, os.path.normpath(path)]) != base:
        raise ValueError("media path escapes the media root")
    return path
