"""Fixtures shared by integration and e2e tests.

Every test that needs PostgreSQL gets its own database, cloned from a template
that was migrated once per run (`CREATE DATABASE … TEMPLATE …`, as
procrastinate does): fast, and tests cannot see each other's rows.
"""

import itertools
import os
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from schema.migrate import migrate
from tests.support.services import database_admin_url

_clone_numbers = itertools.count()


def database_url(admin_url: str, name: str) -> str:
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path="/" + name))


def _admin(sql: str) -> None:
    conn = psycopg2.connect(database_admin_url())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    name = f"farmiq_template_{os.getpid()}"
    _admin(f"DROP DATABASE IF EXISTS {name}")
    _admin(f"CREATE DATABASE {name}")
    migrate(database_url(database_admin_url(), name))
    yield name
    _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(template_database: str) -> Iterator[str]:
    """A fresh, migrated database for this test only."""
    name = f"farmiq_test_{os.getpid()}_{next(_clone_numbers)}"
    _admin(f"CREATE DATABASE {name} TEMPLATE {template_database}")
    yield database_url(database_admin_url(), name)
    _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def empty_db_url() -> Iterator[str]:
    """A database with nothing in it (for migration tests)."""
    name = f"farmiq_empty_{os.getpid()}_{next(_clone_numbers)}"
    _admin(f"CREATE DATABASE {name}")
    yield database_url(database_admin_url(), name)
    _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
