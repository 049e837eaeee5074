"""Database engine: one SQLAlchemy engine per process, created on first use.

Created lazily because dramatiq imports actor modules before it forks worker
processes; a connection pool must never cross a fork.
"""

import os
from contextlib import contextmanager
from typing import Iterator

import psycopg2
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import DBAPIError

_engines: dict[tuple[int, str], Engine] = {}


def engine_for(url: str, pool_size: int = 5, *, ping: bool = True) -> Engine:
    """`ping`: test each pooled connection (a round trip) before handing it out.
    Without it a connection broken by a database restart fails its first use;
    the pool is then replaced and the caller's retry finds fresh connections."""
    key = (os.getpid(), url, ping)
    if key not in _engines:
        _engines[key] = create_engine(
            _sqlalchemy_url(url), pool_size=pool_size, max_overflow=2, pool_pre_ping=ping,
            # Error messages and logs never carry SQL parameters (other devices' values).
            hide_parameters=True,
            # A database host that does not answer is an error within seconds, not a hang.
            connect_args={"application_name": "farmiq-edge", "connect_timeout": 5})
    return _engines[key]


@contextmanager
def transaction(url: str, *, ping: bool = True) -> Iterator[Connection]:
    """One unit of work: commits on success, rolls back on any exception.

    `ping=False` for hot paths that retry any database error anyway (the
    bridge's commit, the ingest actor): no extra round trip per transaction.
    """
    with engine_for(url, ping=ping).begin() as conn:
        yield conn


# Every database error: SQLAlchemy's wrappers and psycopg2's own (raised raw
# by cursors taken with raw_cursor, e.g. COPY).
DB_ERRORS = (DBAPIError, psycopg2.Error)


def is_connection_error(exc: BaseException) -> bool:
    """The database or the connection failed (gone, disk full, query cancelled,
    serialization/deadlock): retry the whole unit. Any other error is about the data."""
    orig = getattr(exc, "orig", None) or exc
    return isinstance(orig, (psycopg2.OperationalError, psycopg2.InterfaceError))


def db_error_class(exc: BaseException) -> str:
    """`DataError 22003`: the driver's error class and SQLSTATE, for logs and failure
    records. Never the message: it can quote values (SQL parameters, payloads)."""
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__} {getattr(orig, 'pgcode', None) or ''}".strip()


def raw_cursor(conn: Connection):  # noqa: ANN201 - a psycopg2 cursor
    """The DBAPI cursor of `conn`, inside the same transaction (for dramatiq-pg)."""
    return conn.connection.dbapi_connection.cursor()


def _sqlalchemy_url(url: str) -> str:
    # Operators write postgresql://…; pin the driver we ship.
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url
