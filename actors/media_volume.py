"""The media volume: frames spooled by the bridge, placed by the media actor, swept when stale.

The bytes of a frame are written to disk once and never travel through the
queue: the bridge decodes them and spools them to `{root}/.staging/`, the
queue carries only a reference (`StagedImage`: staging name, sha256, size),
and the media actor renames the staging file to its final path. Commit points
for one frame, in order:

1. Bridge (`Spool`): bytes -> `.staging/{name}.tmp-*` -> fsync -> rename to
   `.staging/{name}`; once per batch an fsync of `.staging` (`Spool.sync`).
   Then the bridge's transaction enqueues the event with the reference:
   COMMIT, then PUBACK. PUBACK still means durable: the bytes were on disk
   before the commit. A crash before the commit leaves a staging file no
   message names; the device redelivers the message, which names the same
   file (event id + sha256), so it is reused; what a device never sends
   again is swept (`sweep_stale_staging`, at media-worker start and by
   retention).
2. Media actor (actors/media.py), in one transaction holding an advisory
   lock on the media_id: the staged bytes are checked (size, sha256, image
   type), the final folder is made (idempotent), resolved and checked to be
   inside the root (symlinks included), the staging file is renamed to the
   final path (same filesystem: atomic; the staging file is the "temp file"
   of the atomic write) and both folders are fsynced; then the
   media_objects row, the `media.stored` outbox event and the inference
   hand-off are inserted and the transaction COMMITs.
   Crash before the rename: the redelivery starts over. Crash after the
   rename, before the commit: the staging file is gone and the final file
   holds the referenced bytes; the redelivery verifies them and commits the
   row. After the commit: the redelivery finds row and file, does nothing.

Disk pressure: the only bulk write is the bridge's spool, so that is where
EDGE_MEDIA_MIN_FREE_BYTES applies: below it, or on ENOSPC mid-write, the
spool removes its temp file and raises `VolumeFull`; the bridge keeps that
message un-acked and offers it again later, while other messages flow on.
Crash points: bridge.after_spool, media.before_rename, media.before_commit.
"""

import errno
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from actors.faults import crash_point, enospc_point
from actors.metrics import MEDIA_BYTES_WRITTEN, MEDIA_VOLUME_PRESSURE
from models.media_path import STAGING_DIR, STAGING_NAME_RE, staging_name
from models.messages import MediaEvent, StagedImage, decode_image_b64

log = logging.getLogger("farmiq_edge.media_volume")
TEMP_MARK = ".tmp-"


class VolumeFull(Exception):
    """The media volume takes no frame now (below the floor, ENOSPC, not writable): try again later."""


class OutsideRoot(Exception):
    """A path would leave the media root (after resolving symlinks)."""


def free_bytes(root: Path) -> int:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


class _Pressure:
    """One log line and one gauge change per state change, not per frame."""

    def __init__(self) -> None:
        self.full = False
        self.lock = threading.Lock()

    def set(self, full: bool, why: str = "") -> None:
        with self.lock:
            if full == self.full:
                return
            self.full = full
        MEDIA_VOLUME_PRESSURE.set(1 if full else 0)
        if full:
            log.warning("event=media_volume_full action=holding_frames reason=%s", why)
        else:
            log.info("event=media_volume_ok action=writing_frames")


PRESSURE = _Pressure()


def staging_dir(root: Path) -> Path:
    return Path(root) / STAGING_DIR


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The bridge's side: spool each media event of one batch, then `sync()` before the commit."""

    def __init__(self, root: str | Path, *, min_free_bytes: int) -> None:
        self.dir = staging_dir(Path(root))
        self.min_free_bytes = min_free_bytes
        self.dirty = False

    def event_json(self, event: object) -> dict:
        """The queue form of an ingress event: a media event's bytes are spooled, not carried."""
        if not isinstance(event, MediaEvent) or event.image_b64 is None:
            return event.model_dump(mode="json")  # type: ignore[attr-defined]
        data = decode_image_b64(event.image_b64, len(event.image_b64))  # validated at ingress
        staged = self.write(event, data)
        dumped = event.model_dump(mode="json", exclude={"image_b64"})
        dumped["staged"] = staged.model_dump(mode="json")
        return dumped

    def write(self, event: MediaEvent, data: bytes) -> StagedImage:
        sha = hashlib.sha256(data).hexdigest()
        staged = StagedImage(name=staging_name(event.event_id, sha, event.mime_type), sha256=sha,
                             size_bytes=len(data))
        final = self.dir / staged.name
        if final.exists():
            # The same event and bytes, spooled by an earlier attempt (a
            # redelivery): durable already; fresh mtime keeps the sweep off it.
            os.utime(final)
            self.dirty = True
            return staged
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.min_free_bytes and free_bytes(self.dir) - len(data) < self.min_free_bytes:
                PRESSURE.set(True, "below_min_free_bytes")
                raise VolumeFull("media volume below EDGE_MEDIA_MIN_FREE_BYTES")
            write_durably(self.dir / f"{staged.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}", final, data)
        except OSError as exc:
            # Not mounted, read-only, no permission: the frame waits un-acked like
            # on a full disk (one log line), rather than the bridge crash-looping.
            PRESSURE.set(True, errno.errorcode.get(exc.errno or 0, "os_error"))
            raise VolumeFull(f"cannot write to the media volume: {exc.strerror}") from None
        MEDIA_BYTES_WRITTEN.inc(len(data))
        PRESSURE.set(False)
        self.dirty = True
        crash_point("bridge.after_spool")
        return staged

    def sync(self) -> None:
        """Commit point helper: the staging folder's entries are durable before the bridge commits."""
        if self.dirty:
            fsync_dir(self.dir)
            self.dirty = False


def write_durably(temp: Path, final: Path, data: bytes) -> None:
    """temp -> fsync -> rename; on any error (ENOSPC mid-write included) no file is left."""
    try:
        with open(temp, "xb") as f:
            half = len(data) // 2
            f.write(data[:half])
            enospc_point("media.write")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, final)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            PRESSURE.set(True, "enospc")
            raise VolumeFull("no space left on the media volume") from None
        raise


def contained(root: Path, path: Path) -> Path:
    """`path` resolved (symlinks followed); OutsideRoot unless it stays under the resolved root."""
    real_root = Path(root).resolve()
    real = path.resolve()
    if real != real_root and not real.is_relative_to(real_root):
        raise OutsideRoot("media path leaves EDGE_MEDIA_ROOT")
    return real


def make_folder(root: Path, folder: Path) -> None:
    """`mkdir -p` that refuses to create anything outside the root (checked at every level)."""
    root = Path(root)
    contained(root, root)
    parts = folder.relative_to(root).parts
    current = root
    for part in parts:
        current = current / part
        contained(root, current)  # a symlinked folder pointing out is refused before use
        try:
            current.mkdir(exist_ok=True)
        except FileExistsError:
            pass  # a file or dangling link in the way: the check below refuses it
        contained(root, current)
        if not current.is_dir():
            raise OutsideRoot(f"{current.name} is not a folder")


def sha256_of(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sweep_stale_staging(root: str | Path, older_than: float,
                        keep: Callable[[str], bool] = lambda name: False) -> int:
    """Remove staging files (and temp files) older than `older_than` seconds that `keep` does not claim.

    `keep(name)` says whether an unfinished queue message still names the file
    (see actors.media.named_in_queue); returns how many files were removed.
    """
    folder = staging_dir(Path(root))
    if not folder.is_dir():
        return 0
    cutoff, removed = time.time() - older_than, 0
    for entry in os.scandir(folder):
        if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime > cutoff:
            continue
        temp = TEMP_MARK in entry.name
        if not temp and (not STAGING_NAME_RE.fullmatch(entry.name) or keep(entry.name)):
            continue
        os.unlink(entry.path)
        removed += 1
    if removed:
        fsync_dir(folder)
        log.info("event=staging_swept files=%d", removed)
    return removed
