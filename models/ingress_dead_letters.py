"""Rows for ingress_dead_letters (SPEC §1.5). Pure."""

from typing import Any

from models.ids import new_id

MAX_DEAD_LETTER_PAYLOAD = 64 * 1024


def dead_letter_row(topic: str, payload: bytes, reason: str, detail: str, *,
                    size_bytes: int | None = None) -> dict[str, Any]:
    """`payload` is the bytes as received (or their first 64 KiB, then `size_bytes` is
    the full length): the first 64 KiB are kept, the full length recorded."""
    # PostgreSQL text cannot hold NUL; the topic is stored lossily anyway when it is not UTF-8.
    return {"id": new_id(), "topic": topic[:1024].replace("\x00", "\\x00"),
            "payload": payload[:MAX_DEAD_LETTER_PAYLOAD],
            "payload_size_bytes": len(payload) if size_bytes is None else size_bytes,
            "reason": reason, "detail": detail[:1000]}
