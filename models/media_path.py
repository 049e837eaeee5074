"""Where a frame lives on the media volume (edge-persistence.md, "PVC path conventions").

    {root}/{tenant}/{farm}/{barn}/{session_id}/{captured_at}_{media_id}.jpg
    {root}/{tenant}/{farm}/{barn}/monitoring/{device_id}/{captured_at}_{media_id}.jpg

`.png` for PNG frames; `captured_at` in UTC as `YYYYMMDDTHHMMSSmmmZ` (SPEC §1.4).

Frames waiting for the media actor sit in `{root}/.staging/` (a name no
tenant id can take: ids start with a letter or digit), named after the event
and the bytes, so a redelivered message names the same staging file.

Pure: computes a path, touches nothing.
"""

import os
import re
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

from models.ids import ID_PATTERN, ID_RE

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png"}
STAGING_DIR = ".staging"
STAGING_NAME_PATTERN = r"^[0-9a-f]{32}-[0-9a-f]{16}\.(jpg|png)$"
STAGING_NAME_RE = re.compile(STAGING_NAME_PATTERN)


def staging_name(event_id: UUID, sha256: str, mime_type: str) -> str:
    """`{event_id hex}-{first 16 hex of sha256}.jpg`: the same event and bytes, the same name."""
    return f"{UUID(str(event_id)).hex}-{sha256[:16]}.{EXTENSIONS[mime_type]}"


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
