import time
import uuid

from models.ids import new_id


def _unix_ms(u: uuid.UUID) -> int:
    return u.int >> 80


def test_uuid7_layout():
    u = new_id()
    assert type(u) is uuid.UUID and u.version == 7 and u.variant == uuid.RFC_4122


def test_time_in_the_id_follows_the_clock_at_ingest_rates():
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(200_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    assert before <= _unix_ms(ids[0]) and _unix_ms(ids[-1]) <= after
    # Time-ordered to the millisecond (sub-millisecond order is best effort).
    assert all(_unix_ms(a) <= _unix_ms(b) for a, b in zip(ids, ids[1:]))
