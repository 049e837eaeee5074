"""Rows for sync_outbox (SPEC §3 event types). Pure: callers insert them in the
same transaction as the change they describe."""

from datetime import datetime
from typing import Any
from uuid import UUID

from models.ids import new_id

EVENT_TYPES = (
    "telemetry.ingested", "telemetry.aggregated",
    "weighvision.session.created", "weighvision.session.finalized", "weighvision.session.cancelled",
    "media.stored", "inference.completed", "weighvision.session.summary",
)


def outbox_row(event_type: str, *, tenant_id: str, farm_id: str, barn_id: str, device_id: str,
               occurred_at: datetime, payload: dict[str, Any], session_id: UUID | None = None,
               trace_id: str | None = None) -> dict[str, Any]:
    assert event_type in EVENT_TYPES, event_type
    return {"id": new_id(), "tenant_id": tenant_id, "farm_id": farm_id, "barn_id": barn_id,
            "device_id": device_id, "session_id": session_id, "event_type": event_type,
            "occurred_at": occurred_at, "trace_id": trace_id, "payload_json": payload,
            "status": "pending", "attempt_count": 0}
