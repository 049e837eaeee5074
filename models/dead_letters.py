"""Rows for ingress_dead_letters (SPEC §1.5). Pure."""

from typing import Any

from models.ids import new_id

MAX_DEAD_LETTER_PAYLOAD = 64 * 1024


def dead_letter_row(topic: str, payload: bytes, reason: str, detail: str) -> dict[str, Any]:
    return {"id": new_id(), "topic": topic[:1024], "payload": payload[:MAX_DEAD_LETTER_PAYLOAD],
            "reason": reason, "detail": detail[:1000]}
