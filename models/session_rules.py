"""WeighVision session state machine (SPEC §1.3), as a pure merge.

Session events arrive late, out of order and repeated, yet the result must be
the one in-order, exactly-once delivery would give. So the state is a merge
of two independent "earliest wins" registers:

- the start: the earliest `start` sets `start_at`, `initial_weight_kg` and
  `batch_id` together;
- the end: the earliest terminal event sets `status`, `end_at`,
  `final_weight_kg` and `ended_by`; on an exact tie `finalize` beats `cancel`.

Each register keeps the minimum of a total order over events, which makes
`apply_session_event` commutative, associative and idempotent: any arrival
order with any repetitions converges to the same state. Ties on
`occurred_at` are broken on the event's values so that the order is total.

Pure: no I/O.
"""

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

ACTIONS = ("start", "finalize", "cancel")
STATUS_CREATED = "created"
_TERMINAL_STATUS = {"finalize": "finalized", "cancel": "cancelled"}
_EVENT_TYPES = {
    "start": "weighvision.session.created",
    "finalize": "weighvision.session.finalized",
    "cancel": "weighvision.session.cancelled",
}


@dataclass(frozen=True)
class SessionState:
    status: str  # "created" | "finalized" | "cancelled"
    start_at: datetime | None
    end_at: datetime | None
    initial_weight_kg: float | None
    final_weight_kg: float | None
    batch_id: str | None
    ended_by: str | None  # "finalize" | "cancel" | None: which action set end_at


def session_event_type(action: str) -> str:
    """The SPEC §3 outbox event type for a session action."""
    try:
        return _EVENT_TYPES[action]
    except KeyError:
        raise ValueError(f"unknown session action {action!r}") from None


def _start_key(at: datetime, weight: float | None, batch: str | None) -> tuple[Any, ...]:
    # Earliest first; on a tie prefer a start that names a batch, then one
    # that carries a weight, then the smaller value (any fixed rule will do).
    return (at, batch is None, batch or "", weight is None, weight or 0.0)


def _end_key(at: datetime, action: str, weight: float | None) -> tuple[Any, ...]:
    # A cancel carries no weight into the state, so its key ignores it.
    if action == "cancel":
        return (at, 1, True, 0.0)
    return (at, 0, weight is None, weight or 0.0)


def _apply_start(
    state: SessionState | None, at: datetime, weight: float | None, batch: str | None
) -> SessionState:
    if state is None:
        return SessionState(STATUS_CREATED, at, None, weight, None, batch, None)
    if state.start_at is not None and _start_key(
        state.start_at, state.initial_weight_kg, state.batch_id
    ) <= _start_key(at, weight, batch):
        return state
    # A start never reopens a session: status stays what the end register says.
    return replace(state, start_at=at, initial_weight_kg=weight, batch_id=batch)


def _apply_end(
    state: SessionState | None, action: str, at: datetime, weight: float | None
) -> SessionState:
    final_weight = weight if action == "finalize" else None
    status = _TERMINAL_STATUS[action]
    if state is None:
        # Terminal before any start: the start fields are filled in later.
        return SessionState(status, None, at, None, final_weight, None, action)
    if (
        state.ended_by is not None
        and state.end_at is not None
        and _end_key(state.end_at, state.ended_by, state.final_weight_kg)
        <= _end_key(at, action, weight)
    ):
        return state
    return replace(state, status=status, end_at=at, final_weight_kg=final_weight, ended_by=action)


def apply_session_event(
    state: SessionState | None,
    action: str,
    occurred_at: datetime,
    weight_kg: float | None,
    batch_id: str | None,
) -> SessionState | None:
    """The state after one event, or None when the event changes nothing.

    `batch_id` only matters on `start`; `weight_kg` is the initial weight on
    `start`, the final weight on `finalize` and ignored on `cancel`.
    """
    if action == "start":
        new = _apply_start(state, occurred_at, weight_kg, batch_id)
    elif action in _TERMINAL_STATUS:
        new = _apply_end(state, action, occurred_at, weight_kg)
    else:
        raise ValueError(f"unknown session action {action!r}")
    return None if new == state else new
