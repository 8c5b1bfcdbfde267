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


def check_rows_survive_a_round_trip(url: str) -> None:
    """Down to 0001 and up again with data in the tables: nothing is lost on the way."""
    from sqlalchemy import func, select

    from db.models import Image, Job, JobPart, Tenant
    from db.session import make_sessionmaker

    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, image_count=2, request_sha256="a" * 64, receiving=True,  # a job in parts,
                  callback_url="https://h.example/hook", callback_state="receiving")  # its callback held
        session.add(job)
        session.flush()
        session.add_all([Image(job_id=job.id, tenant_id=tenant.id, position=i, status="queued") for i in range(2)])
        session.add(JobPart(job_id=job.id, first_position=0, image_count=2, idempotency_key="p0"))
    engine.dispose()
    downgrade(url, "0001")
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 2, "no image row cascaded away"
        assert session.scalar(select(func.count()).select_from(Job)) == 1
        assert session.scalar(select(Job.request_sha256)) is None, "the column came back empty"
        assert session.scalar(select(Job.callback_state)) is None, "the held callback was released on the way down"
    engine.dispose()


def test_downgrade_keeps_rows_on_sqlite(tmp_path):
    check_rows_survive_a_round_trip(f"sqlite:///{tmp_path / 'rows.sqlite'}")


@pytest.mark.integration
def test_downgrade_keeps_rows_on_postgresql(pg_url):
    check_rows_survive_a_round_trip(pg_url)


def check_older_code_inserts_whole_jobs(url: str) -> None:
    """Code from before 0003 inserts jobs without `receiving`: they are jobs submitted whole (the
    server default), so API replicas and workers can be upgraded one by one."""
    import uuid

    from sqlalchemy import text

    upgrade(url)
    engine = make_engine(url)
    tenant, job = str(uuid.uuid4()), str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES (:id, 'old', CURRENT_TIMESTAMP)"), {"id": tenant})
        conn.execute(text("INSERT INTO jobs (id, tenant_id, image_count, created_at) VALUES (:id, :t, 0, CURRENT_TIMESTAMP)"),
                     {"id": job, "t": tenant})
        assert conn.execute(text("SELECT receiving, closed_at FROM jobs")).one() == (False, None)
    engine.dispose()


def test_older_code_inserts_whole_jobs_on_sqlite(tmp_path):
    check_older_code_inserts_whole_jobs(f"sqlite:///{tmp_path / 'old.sqlite'}")


@pytest.mark.integration
def test_older_code_inserts_whole_jobs_on_postgresql(pg_url):
    check_older_code_inserts_whole_jobs(pg_url)
