"""Fixtures shared by integration and e2e tests.

Every test that needs PostgreSQL gets its own database, cloned from a template
that was migrated once per run (`CREATE DATABASE … TEMPLATE …`, as
procrastinate does): fast, and tests cannot see each other's rows.
"""

import itertools
import os
from collections.abc import Iterator

import pytest

from schema.databases import create_database, drop_database
from schema.migrate import migrate
from tests.support.services import database_admin_url

_clone_numbers = itertools.count()


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    name = f"farmiq_template_{os.getpid()}"
    migrate(create_database(database_admin_url(), name))
    yield name
    drop_database(database_admin_url(), name)


@pytest.fixture
def db_url(template_database: str) -> Iterator[str]:
    """A fresh, migrated database for this test only."""
    name = f"farmiq_test_{os.getpid()}_{next(_clone_numbers)}"
    yield create_database(database_admin_url(), name, template=template_database)
    drop_database(database_admin_url(), name)


@pytest.fixture
def empty_db_url() -> Iterator[str]:
    """A database with nothing in it (for migration tests)."""
    name = f"farmiq_empty_{os.getpid()}_{next(_clone_numbers)}"
    yield create_database(database_admin_url(), name)
    drop_database(database_admin_url(), name)
