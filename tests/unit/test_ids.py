import time
import uuid

from models.ids import new_id, new_id_texts


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


def test_bulk_id_texts_are_uuid7_in_time_and_distinct():
    before = time.time_ns() // 1_000_000
    texts = new_id_texts(100_000)
    after = time.time_ns() // 1_000_000
    ids = [uuid.UUID(t) for t in texts]
    assert [str(u) for u in ids] == texts  # canonical text
    assert len(set(ids)) == len(ids)
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert all(before <= _unix_ms(u) <= after for u in ids)
    assert len({u.int & (2**62 - 1) for u in ids}) == len(ids)  # the random bits differ
