"""Property: no id, however crafted, makes the media actor write outside EDGE_MEDIA_ROOT.

The ids reach `store_frame` unvalidated (`model_construct`), as if a queue
message had been forged: `..`, `/`, `%2e`, absolute paths, unicode look-alikes,
NUL, over-long ids, and folders inside the root that are symlinks to the outside.
"""

from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from actors.dead_letters import PermanentError
from actors.media import store_frame
from actors.media_volume import Spool, staging_dir
from models.messages import MediaEvent, StagedImage
from models.settings import load_settings
from tests.integration.test_media import parsed
from workers.dev.frames import bird_frame

CRAFTED = ["..", ".", "../..", "/etc", "/", "a/../../x", "%2e%2e", "%2e%2e%2f", "..%2f",
           "\u2024\u2024", "\uff0e\uff0e", "a\u2215b", "\uff0fetc", "a\x00b", "C:\\x", "~", "a" * 65,
           "link-out", "tenant-a", "farm-1", "barn-1", "monitoring", ".staging", "ok-id"]
ids = st.one_of(st.sampled_from(CRAFTED),
                st.text(alphabet="./%2ea\\-_\u2024\uff0e\u2215\uff0f\x00~", min_size=0, max_size=12))
names = st.one_of(st.just("0" * 32 + "-" + "0" * 16 + ".jpg"),
                  st.sampled_from(["../../outside/x.jpg", "/etc/passwd", "..", "link-out/x.jpg"]),
                  st.text(alphabet="./%2ea\\-\x00", max_size=20))


@pytest.fixture
def volume(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    # Symlinked folders at every level of the SPEC path, all pointing out.
    for folder in (root, root / "tenant-a", root / "tenant-a" / "farm-1",
                   root / "tenant-a" / "farm-1" / "barn-1", root / "tenant-a" / "farm-1" / "barn-1" / "monitoring"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "link-out").symlink_to(outside, target_is_directory=True)
    (root / ".staging").mkdir()
    (root / ".staging" / "link-out").symlink_to(outside, target_is_directory=True)
    return root, outside


def outside_untouched(root: Path, outside: Path) -> None:
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in root.parent.iterdir()) == ["outside", "root"]


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tenant=ids, farm=ids, barn=ids, device=ids, with_session=st.booleans(), name=names)
def test_no_crafted_id_writes_outside_the_root(db_url, volume, tenant, farm, barn, device, with_session,
                                               name):
    root, outside = volume
    event = MediaEvent.model_construct(
        event_id=UUID(int=1), occurred_at=datetime(2026, 11, 27, tzinfo=timezone.utc), tenant_id=tenant,
        farm_id=farm, barn_id=barn, device_id=device, kind="media", media_id=UUID(int=2),
        session_id=UUID(int=3) if with_session else None,
        captured_at=datetime(2026, 11, 27, tzinfo=timezone.utc), mime_type="image/jpeg",
        image_b64=None, staged=StagedImage.model_construct(name=name, sha256="0" * 64, size_bytes=1),
        trace_id=None)
    with pytest.raises(PermanentError):  # nothing is staged under these names
        store_frame(load_settings(database_url=db_url, media_root=str(root)), event)
    outside_untouched(root, outside)


@pytest.mark.parametrize("ids_", [("link-out", "farm-1", "barn-1", "d-1"),
                                  ("tenant-a", "link-out", "barn-1", "d-1"),
                                  ("tenant-a", "farm-1", "link-out", "d-1"),
                                  ("tenant-a", "farm-1", "barn-1", "link-out")])
def test_a_real_frame_into_a_symlinked_folder_is_refused(db_url, volume, ids_):
    root, outside = volume
    tenant, farm, barn, device = ids_
    event = parsed(bird_frame(seed=9).data, session_id=None, device_id=device)
    event = event.model_copy(update={"tenant_id": tenant, "farm_id": farm, "barn_id": barn})
    spool = Spool(root, min_free_bytes=0)
    queued = MediaEvent.model_validate(spool.event_json(event))
    with pytest.raises(PermanentError, match="leaves EDGE_MEDIA_ROOT"):
        store_frame(load_settings(database_url=db_url, media_root=str(root)), queued)
    outside_untouched(root, outside)
    assert (staging_dir(root) / queued.staged.name).is_file()  # kept for the operator (dead letter)
