"""Identifiers: time-ordered row ids, deterministic media ids, the id pattern.

Pure: no I/O.
"""

import re
import uuid
from uuid import UUID

import uuid6

# SPEC §1: every topic id and `batch_id`. Ids become path segments on the
# media volume and label values in the database, so the alphabet is closed.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# Always use `ID_RE.fullmatch`: with `match`/`search`, `$` also matches before
# a trailing newline, so "abc\n" would pass.
ID_RE = re.compile(ID_PATTERN)

# Fixed namespace for uuid5 ids derived by this project; changing it renames
# every derived media file, so it never changes.
_MEDIA_NAMESPACE = UUID("78b99fd0-ef4d-4a21-9c1a-0606ec6c490b")


def new_id() -> UUID:
    """A new UUIDv7: time-ordered, so primary-key inserts stay index-local."""
    # uuid6 returns its own subclass; hand out the stdlib type everywhere.
    return UUID(int=uuid6.uuid7().int)


def media_id_for(event_id: UUID) -> UUID:
    """The media id of a frame sent without one.

    Deterministic, so a redelivered message names the same file and the same
    `media_objects` row instead of storing the frame twice.
    """
    return uuid.uuid5(_MEDIA_NAMESPACE, str(event_id))


def is_valid_id(value: str) -> bool:
    return ID_RE.fullmatch(value) is not None
