"""dramatiq's failure log lines name messages by id and hide database error text."""

import logging

import psycopg2.errors
from dramatiq.message import Message
from sqlalchemy.exc import DataError

from actors.log_hygiene import RedactPayloads

SECRET = "device-42-reading-98.6"


def _format(record: logging.LogRecord) -> str:
    RedactPayloads().filter(record)
    return logging.Formatter("%(message)s").format(record)


def test_failed_message_is_named_by_actor_and_id_only() -> None:
    message = Message(queue_name="ingest", actor_name="ingest_batch", args=([{"v": SECRET}],), kwargs={},
                      options={}, message_id="m-1")
    record = logging.LogRecord("dramatiq.worker.WorkerThread", logging.ERROR, __file__, 1,
                               "Failed to process message %s with unhandled exception.", (message,), None)
    line = _format(record)
    assert SECRET not in line and "ingest_batch(message_id=m-1)" in line


def test_database_error_text_is_replaced_by_its_class() -> None:
    try:
        try:
            raise psycopg2.errors.NumericValueOutOfRange(f"value out of range; CONTEXT: COPY line {SECRET}")
        except psycopg2.Error as orig:
            raise DataError("INSERT …", {"v": SECRET}, orig) from orig
    except DataError as exc:
        record = logging.LogRecord("dramatiq.worker.WorkerThread", logging.ERROR, __file__, 1,
                                   "Failed", (), (type(exc), exc, exc.__traceback__))
    line = _format(record)
    assert SECRET not in line
    assert "NumericValueOutOfRange" in line and "Traceback" in line and "test_log_hygiene.py" in line
