"""Apply numbered SQL migrations in order, once, recorded in schema_migrations.

Safe to run twice (applied versions are skipped) and from two processes at once
(a session advisory lock serialises them; the loser waits, then finds nothing
to do). Each migration and its schema_migrations row commit together, so a
crash mid-migration leaves it unapplied, never half-recorded.
"""

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import psycopg2
from dramatiq_pg import generate_init_sql

log = logging.getLogger(__name__)

# hashtext() is stable across PostgreSQL versions; any constant would do.
MIGRATION_LOCK_KEY = "farmiq-edge:migrate"
# Monthly partitions kept ready: the month before retention's reach is dropped
# by the maintenance job, the next three months are created ahead.
PARTITION_MONTHS_BACK = 3
PARTITION_MONTHS_AHEAD = 3


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    files = resources.files("schema").joinpath("migrations")
    found = [Migration(f.name.removesuffix(".sql"), f.read_text())
             for f in files.iterdir() if f.name.endswith(".sql")]
    # dramatiq-pg's own queue table, from the installed package so that it
    # always matches the broker code. It must precede 0003 (which indexes it).
    found.append(Migration("0000_dramatiq_pg_queue", generate_init_sql()))
    return sorted(found, key=lambda m: m.version)


def migrate(database_url: str) -> list[str]:
    """Apply pending migrations; return the versions applied by this call."""
    applied_now = []
    conn = psycopg2.connect(database_url, application_name="farmiq-edge migrate")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(hashtext(%s))", (MIGRATION_LOCK_KEY,))
            cur.execute("""
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version     text        PRIMARY KEY,
                    checksum    text        NOT NULL,
                    applied_at  timestamptz NOT NULL DEFAULT now())""")
            cur.execute("SELECT version, checksum FROM schema_migrations")
            done = dict(cur.fetchall())
        conn.autocommit = False
        for migration in load_migrations():
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    log.warning("event=migration_changed version=%s (applied text differs from file)",
                                migration.version)
                continue
            with conn, conn.cursor() as cur:  # one transaction: DDL + record
                cur.execute(migration.sql)
                cur.execute("INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                            (migration.version, migration.checksum))
            log.info("event=migration_applied version=%s", migration.version)
            applied_now.append(migration.version)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT farmiq_ensure_partitions(%s, %s)",
                        (PARTITION_MONTHS_BACK, PARTITION_MONTHS_AHEAD))
    finally:
        conn.close()  # also releases the advisory lock
    return applied_now


def pending_migrations(database_url: str) -> list[str]:
    """Versions not yet applied (used by the health check)."""
    with psycopg2.connect(database_url, connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not cur.fetchone()[0]:
            return [m.version for m in load_migrations()]
        cur.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in cur.fetchall()}
    conn.close()
    return [m.version for m in load_migrations() if m.version not in done]
