"""Identifiers: time-ordered row ids, deterministic media ids, the id pattern.

Pure: no I/O.
"""

import re
import secrets
import time
import uuid
from uuid import UUID

# SPEC §1: every topic id and `batch_id`. Ids become path segments on the
# media volume and label values in the database, so the alphabet is closed.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# Always use `ID_RE.fullmatch`: with `match`/`search`, `$` also matches before
# a trailing newline, so "abc\n" would pass.
ID_RE = re.compile(ID_PATTERN)

# Fixed namespace for uuid5 ids derived by this project; changing it renames
# every derived media file, so it never changes.
_MEDIA_NAMESPACE = UUID("78b99fd0-ef4d-4a21-9c1a-0606ec6c490b")
# A byte with the RFC 9562 variant (0b10) in its top bits: bytes.translate table.
_VARIANT_10 = bytes(0x80 | (b & 0x3F) for b in range(256))


def new_id() -> UUID:
    """A new UUIDv7: time-ordered, so primary-key inserts stay index-local.

    RFC 9562 §6.2 method 3: 48 bits of Unix milliseconds, then 12 bits of
    sub-millisecond clock, then 62 random bits. Not `uuid6.uuid7()`: to stay
    monotonic it adds 1 ms for every id made within the same millisecond, so
    at ingest rates (20,000 rows/s) the time in the id ran minutes ahead of
    the clock and kept going (tests/unit/test_ids.py).
    """
    ns = time.time_ns()
    ms, sub_ms = divmod(ns, 1_000_000)
    value = (ms << 80) | (0x7 << 76) | ((sub_ms * 4096 // 1_000_000) << 64)
    value |= (0b10 << 62) | secrets.randbits(62)
    return UUID(int=value)


def new_id_texts(n: int) -> list[str]:
    """`n` UUIDv7s as canonical text, for bulk COPY (the ingest hot path).

    Same layout as `new_id`, one clock reading and one read of the OS random
    source for the whole batch: per id, `secrets.randbits` is a system call.
    The ids share their first 64 bits (the clock), so only the last 64 (the
    variant and 62 random bits) are made per id, as hex in one call.
    """
    ns = time.time_ns()
    ms, sub_ms = divmod(ns, 1_000_000)
    head = f"{(ms << 16) | (0x7 << 12) | (sub_ms * 4096 // 1_000_000):016x}"
    prefix = f"{head[:8]}-{head[8:12]}-{head[12:]}-"
    tails = bytearray(secrets.token_bytes(8 * n))
    tails[::8] = tails[::8].translate(_VARIANT_10)  # each id's byte 8: 0b10xxxxxx
    hex_tails = tails.hex()
    return [f"{prefix}{hex_tails[i:i + 4]}-{hex_tails[i + 4:i + 16]}" for i in range(0, 16 * n, 16)]


def media_id_for(event_id: UUID) -> UUID:
    """The media id of a frame sent without one.

    Deterministic, so a redelivered message names the same file and the same
    `media_objects` row instead of storing the frame twice.
    """
    return uuid.uuid5(_MEDIA_NAMESPACE, str(event_id))


def is_valid_id(value: str) -> bool:
    return ID_RE.fullmatch(value) is not None
