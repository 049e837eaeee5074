"""models/tables.py mirrors the migrated schema (the migrations are the truth)."""

from sqlalchemy import create_engine, inspect

from models.tables import metadata
from schema.db import _sqlalchemy_url


def test_table_mirror_matches_the_database(db_url):
    engine = create_engine(_sqlalchemy_url(db_url))
    try:
        inspector = inspect(engine)
        for table in metadata.sorted_tables:
            columns = {c["name"]: c for c in inspector.get_columns(table.name)}
            assert set(columns) == {c.name for c in table.columns}, table.name
            for column in table.columns:
                db_type = columns[column.name]["type"]
                assert db_type._type_affinity is column.type._type_affinity, (table.name, column.name)
            pk = inspector.get_pk_constraint(table.name)["constrained_columns"]
            assert set(pk) == {c.name for c in table.primary_key.columns} or not pk, table.name
    finally:
        engine.dispose()
