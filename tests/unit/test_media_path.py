"""edge-persistence.md "PVC path conventions" and SPEC §1.4 file names."""

from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID

import pytest

from models.media_path import captured_at_stamp, media_path

ROOT = Path("/data/media")
MEDIA_ID = UUID("0199a0b2-6c1e-7d3a-9f10-2b6f3f0e9a13")
SESSION_ID = UUID("0199a0b2-6c1e-7d3a-9f10-2b6f3f0e9a12")
CAPTURED = datetime(2026, 11, 27, 10, 0, 1, 250_999, tzinfo=timezone.utc)
IDS = {"tenant_id": "tenant-a", "farm_id": "farm-1", "barn_id": "barn-1", "device_id": "cam-1"}


def path(**changes: object) -> Path:
    kwargs: dict[str, object] = IDS | {
        "session_id": SESSION_ID,
        "captured_at": CAPTURED,
        "media_id": MEDIA_ID,
        "mime_type": "image/jpeg",
    }
    return media_path(ROOT, **(kwargs | changes))  # type: ignore[arg-type]


def test_session_frame() -> None:
    assert path() == Path(
        "/data/media/tenant-a/farm-1/barn-1/0199a0b2-6c1e-7d3a-9f10-2b6f3f0e9a12/"
        "20261127T100001250Z_0199a0b2-6c1e-7d3a-9f10-2b6f3f0e9a13.jpg"
    )


def test_monitoring_frame() -> None:
    assert path(session_id=None) == Path(
        "/data/media/tenant-a/farm-1/barn-1/monitoring/cam-1/"
        "20261127T100001250Z_0199a0b2-6c1e-7d3a-9f10-2b6f3f0e9a13.jpg"
    )


def test_png_extension() -> None:
    assert path(mime_type="image/png").suffix == ".png"


def test_ids_read_back_as_text() -> None:
    assert path(session_id=str(SESSION_ID), media_id=str(MEDIA_ID)) == path()


def test_stamp_is_utc_milliseconds() -> None:
    plus7 = CAPTURED.astimezone(timezone(timedelta(hours=7)))
    assert captured_at_stamp(plus7) == "20261127T100001250Z"
    assert captured_at_stamp(CAPTURED.replace(microsecond=0)) == "20261127T100001000Z"
    assert captured_at_stamp(CAPTURED.replace(microsecond=999)) == "20261127T100001000Z"


def test_stamps_sort_by_time() -> None:
    moments = [CAPTURED + timedelta(milliseconds=n * 37) for n in range(100)]
    assert sorted(moments, key=captured_at_stamp) == moments


def test_naive_captured_at_is_refused() -> None:
    with pytest.raises(ValueError):
        path(captured_at=CAPTURED.replace(tzinfo=None))


def test_unknown_mime_is_refused() -> None:
    with pytest.raises(ValueError):
        path(mime_type="image/gif")


@pytest.mark.parametrize("field", ["tenant_id", "farm_id", "barn_id", "device_id"])
@pytest.mark.parametrize("value", ["..", ".", "a/b", "/etc", "", "a\n"])
def test_unsafe_ids_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValueError):
        path(**{field: value, "session_id": None})


@pytest.mark.parametrize("session_id", ["../../etc", "not-a-uuid"])
def test_session_id_must_be_a_uuid(session_id: str) -> None:
    with pytest.raises(ValueError):
        path(session_id=session_id)


def test_relative_root() -> None:
    assert path_under(Path("media")).parts[:2] == ("media", "tenant-a")


def path_under(root: Path) -> Path:
    return media_path(root, **IDS, session_id=None, captured_at=CAPTURED, media_id=MEDIA_ID,
                      mime_type="image/jpeg")
