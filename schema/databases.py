"""Whole databases on a server: for test fixtures and the benchmark's scratch database."""

from urllib.parse import urlsplit, urlunsplit

import psycopg2


def database_url(server_url: str, name: str) -> str:
    """`server_url` with its database name replaced by `name`."""
    return urlunsplit(urlsplit(server_url)._replace(path="/" + name))


def database_answers(url: str, timeout_seconds: int = 2) -> bool:
    """True if a connection to `url` opens within the timeout."""
    try:
        psycopg2.connect(url, connect_timeout=timeout_seconds).close()
        return True
    except psycopg2.OperationalError:
        return False


def admin_execute(server_url: str, sql: str) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
    conn = psycopg2.connect(server_url, connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def create_database(server_url: str, name: str, *, template: str | None = None) -> str:
    admin_execute(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin_execute(server_url, f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    return database_url(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    admin_execute(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
