"""Alembic migrations run from an empty database, on SQLite and PostgreSQL,
and produce exactly the schema the models describe."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from db.migrate import downgrade, upgrade
from db.models import Base
from db.session import make_engine


def check_from_empty(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert {"tenants", "api_keys", "jobs", "images", "alembic_version"} <= set(inspect(conn).get_table_names())
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
    downgrade(url, "base")
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    upgrade(url)  # and back up again
    engine.dispose()


def test_migrations_run_from_empty_on_sqlite(tmp_path):
    check_from_empty(f"sqlite:///{tmp_path / 'empty.sqlite'}")


@pytest.mark.integration
def test_migrations_run_from_empty_on_postgresql(pg_url):
    check_from_empty(pg_url)
