"""SPEC §1.3: session events converge whatever the arrival order and repetition."""

from datetime import datetime, timedelta, timezone
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.session_rules import SessionState, apply_session_event, session_event_type

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Event(NamedTuple):
    action: str
    occurred_at: datetime
    weight_kg: float | None = None
    batch_id: str | None = None


def fold(events: list[Event], state: SessionState | None = None) -> SessionState | None:
    for event in events:
        state = apply_session_event(state, *event) or state
    return state


def test_event_types() -> None:
    assert session_event_type("start") == "weighvision.session.created"
    assert session_event_type("finalize") == "weighvision.session.finalized"
    assert session_event_type("cancel") == "weighvision.session.cancelled"
    with pytest.raises(ValueError):
        session_event_type("pause")


def test_unknown_action() -> None:
    with pytest.raises(ValueError):
        apply_session_event(None, "pause", T0, None, None)


def test_start_then_finalize() -> None:
    state = fold([Event("start", at(0), 1.5, "b-1"), Event("finalize", at(60), 2.0)])
    assert state == SessionState("finalized", at(0), at(60), 1.5, 2.0, "b-1", "finalize")


def test_start_creates() -> None:
    assert apply_session_event(None, "start", at(0), 1.5, "b-1") == SessionState(
        "created", at(0), None, 1.5, None, "b-1", None
    )


def test_finalize_before_start() -> None:
    state = apply_session_event(None, "finalize", at(60), 2.0, None)
    assert state == SessionState("finalized", None, at(60), None, 2.0, None, "finalize")
    state = apply_session_event(state, "start", at(0), 1.5, "b-1")
    assert state == SessionState("finalized", at(0), at(60), 1.5, 2.0, "b-1", "finalize")


def test_duplicate_finalize_changes_nothing() -> None:
    state = fold([Event("start", at(0)), Event("finalize", at(60), 2.0)])
    assert apply_session_event(state, "finalize", at(60), 2.0, None) is None
    assert apply_session_event(state, "start", at(0), None, None) is None


def test_later_finalize_changes_nothing() -> None:
    state = fold([Event("start", at(0)), Event("finalize", at(60), 2.0)])
    assert apply_session_event(state, "finalize", at(90), 3.0, None) is None


def test_earlier_finalize_wins() -> None:
    state = fold([Event("start", at(0)), Event("finalize", at(60), 2.0)])
    assert apply_session_event(state, "finalize", at(30), 1.0, None) == SessionState(
        "finalized", at(0), at(30), None, 1.0, None, "finalize"
    )


def test_cancel_after_finalize_changes_nothing() -> None:
    state = fold([Event("start", at(0)), Event("finalize", at(60), 2.0)])
    assert apply_session_event(state, "cancel", at(61), None, None) is None


def test_cancel_that_occurred_first_wins_even_if_it_arrives_last() -> None:
    state = fold([Event("start", at(0)), Event("finalize", at(60), 2.0)])
    assert apply_session_event(state, "cancel", at(59), None, None) == SessionState(
        "cancelled", at(0), at(59), None, None, None, "cancel"
    )


def test_finalize_beats_cancel_on_a_tie() -> None:
    finalize, cancel = Event("finalize", at(60), 2.0), Event("cancel", at(60))
    expected = SessionState("finalized", at(0), at(60), None, 2.0, None, "finalize")
    assert fold([Event("start", at(0)), cancel, finalize]) == expected
    assert fold([Event("start", at(0)), finalize, cancel]) == expected


def test_start_after_cancel_does_not_reopen() -> None:
    state = fold([Event("start", at(0)), Event("cancel", at(30))])
    assert apply_session_event(state, "start", at(40), 1.0, "b-2") is None
    assert state is not None and state.status == "cancelled"


def test_late_start_after_cancel_fills_start_but_keeps_status() -> None:
    state = apply_session_event(None, "cancel", at(30), None, None)
    state = apply_session_event(state, "start", at(0), 1.2, "b-1")
    assert state == SessionState("cancelled", at(0), at(30), 1.2, None, "b-1", "cancel")


def test_earliest_start_wins() -> None:
    state = fold([Event("start", at(10), 2.0, "late"), Event("start", at(0), 1.0, "early")])
    assert state == SessionState("created", at(0), None, 1.0, None, "early", None)
    assert apply_session_event(state, "start", at(5), 9.0, "mid") is None


def test_earliest_start_without_batch_keeps_no_batch() -> None:
    # The earliest start decides all start fields; in order, the later start is
    # a repeat of a session that already exists.
    in_order = fold([Event("start", at(0), None, None), Event("start", at(10), 2.0, "b-1")])
    reversed_ = fold([Event("start", at(10), 2.0, "b-1"), Event("start", at(0), None, None)])
    assert in_order == reversed_ == SessionState("created", at(0), None, None, None, None, None)


def test_cancel_weight_is_ignored() -> None:
    state = apply_session_event(None, "cancel", at(30), 5.0, None)
    assert state is not None and state.final_weight_kg is None
    assert apply_session_event(state, "cancel", at(30), 7.0, None) is None


def test_same_instant_in_another_zone_is_a_duplicate() -> None:
    state = fold([Event("start", at(0))])
    plus7 = at(0).astimezone(timezone(timedelta(hours=7)))
    assert apply_session_event(state, "start", plus7, None, None) is None


# --- convergence property -----------------------------------------------------

_RANK = {"start": 0, "finalize": 1, "cancel": 2}

_events = st.builds(
    Event,
    action=st.sampled_from(["start", "finalize", "cancel"]),
    # A handful of instants, so ties are common.
    occurred_at=st.integers(0, 6).map(lambda s: at(s * 10)),
    weight_kg=st.none() | st.sampled_from([0.0, 1.5, 2.0, 1000.0]),
    batch_id=st.none() | st.sampled_from(["a", "b"]),
)


def _oracle(events: list[Event]) -> SessionState | None:
    """What in-order, exactly-once delivery gives, computed independently."""
    starts = [e for e in events if e.action == "start"]
    ends = [e for e in events if e.action != "start"]
    if not events:
        return None
    start_at = initial = batch = None
    if starts:
        first = min(starts, key=lambda e: (e.occurred_at, e.batch_id is None, e.batch_id or "",
                                           e.weight_kg is None, e.weight_kg or 0.0))
        start_at, initial, batch = first.occurred_at, first.weight_kg, first.batch_id
    if not ends:
        return SessionState("created", start_at, None, initial, None, batch, None)
    end = min(ends, key=lambda e: (e.occurred_at, _RANK[e.action],
                                   e.action == "cancel" or e.weight_kg is None,
                                   0.0 if e.action == "cancel" else e.weight_kg or 0.0))
    status = "finalized" if end.action == "finalize" else "cancelled"
    final = end.weight_kg if end.action == "finalize" else None
    return SessionState(status, start_at, end.occurred_at, initial, final, batch, end.action)


@given(events=st.lists(_events, max_size=8, unique=True), data=st.data())
def test_any_order_and_repetition_converges(events: list[Event], data: st.DataObject) -> None:
    in_order = fold(sorted(events, key=lambda e: (e.occurred_at, _RANK[e.action])))
    extra = data.draw(st.lists(st.sampled_from(events), max_size=8)) if events else []
    arrival = data.draw(st.permutations(events + extra))
    assert fold(arrival) == in_order == _oracle(events)


@given(events=st.lists(_events, min_size=1, max_size=6), data=st.data())
def test_a_repeat_never_changes_the_state(events: list[Event], data: st.DataObject) -> None:
    state = fold(events)
    repeat = data.draw(st.sampled_from(events))
    assert apply_session_event(state, *repeat) is None


@given(events=st.lists(_events, min_size=1, max_size=6))
def test_never_back_to_created(events: list[Event]) -> None:
    state = None
    for event in events:
        new = apply_session_event(state, *event)
        if state is not None and state.status != "created":
            assert new is None or new.status != "created"
        state = new or state
