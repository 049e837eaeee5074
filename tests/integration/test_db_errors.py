"""Database errors carry no SQL parameters (schema/db.py: hide_parameters) and are classified."""

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from schema.db import db_error_class, is_connection_error, transaction

SECRET = "other-device-value-1234567"


def test_error_messages_hide_parameters_and_classify(db_url: str) -> None:
    with pytest.raises(DBAPIError) as caught:
        with transaction(db_url) as conn:
            conn.execute(text("SELECT CAST(:v AS integer)"), {"v": SECRET})
    assert SECRET not in str(caught.value).split("[SQL:")[1]  # the statement part: no parameters
    assert "parameters hidden" in str(caught.value)
    # PostgreSQL's own message still quotes the value: logs use db_error_class, never str(exc).
    assert SECRET in str(caught.value.orig)
    assert db_error_class(caught.value) == "InvalidTextRepresentation 22P02"
    assert not is_connection_error(caught.value)


def test_unreachable_database_is_a_connection_error() -> None:
    with pytest.raises(DBAPIError) as caught:
        with transaction("postgresql://postgres@127.0.0.1:1/postgres") as conn:
            conn.execute(text("SELECT 1"))
    assert is_connection_error(caught.value)
