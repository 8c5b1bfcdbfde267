"""When a job's callback becomes due, on a real migrated SQLite database: only
once the job has no unfinished image, exactly once, and the reconciler's sweep
re-sends a 'pending' callback only after it has been silent too long. The
broker is a recorder here (what would be sent, and to which queue); the real
broker and worker run in tests/integration/test_hospital_formats.py."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from bonedetect.settings import Settings
from db.migrate import upgrade
from db.models import CallbackDelivery, Image, Job, Tenant, utcnow
from db.session import make_engine, make_sessionmaker
from db.tenants import create_tenant
from worker.callbacks import CALLBACK_TASK, claim_finished, signature, sweep_callbacks


class Recorder:
    def __init__(self):
        self.sent = []

    def send_task(self, name, args, queue):
        self.sent.append((name, args[0], queue))


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'bd.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def add_job(sessions, statuses, callback_url="https://hospital.example/hook", finished_ago_s=0.0) -> str:
    with sessions.begin() as session:
        tenant = session.scalar(select(Tenant))
        if tenant is None:
            tenant, _ = create_tenant(session, "hospital-a")
        job = Job(tenant_id=tenant.id, callback_url=callback_url)
        session.add(job)
        session.flush()
        finished = utcnow() - timedelta(seconds=finished_ago_s)
        for i, status in enumerate(statuses):
            done = status not in ("queued", "processing")
            session.add(Image(job_id=job.id, tenant_id=tenant.id, position=i, status=status, finished_at=finished if done else None))
        return job.id


def test_claim_waits_for_the_last_image_and_wins_once(db):
    running = add_job(db, ["done", "processing"])
    queued = add_job(db, ["queued"])
    finished = add_job(db, ["done", "failed", "cancelled"])
    no_url = add_job(db, ["done"], callback_url=None)
    with db.begin() as session:
        assert claim_finished(session, [running, queued, finished, no_url]) == [finished]
    with db.begin() as session:
        assert claim_finished(session, [finished]) == [], "already claimed"
        session.execute(update(Image).where(Image.job_id == running).values(status="done"))
    with db.begin() as session:
        assert claim_finished(session, None) == [running]


def test_sweep_sends_unclaimed_finished_jobs_and_silent_pending_ones(db):
    settings = Settings.from_env({"QUEUE_NAME": "seg", "CALLBACK_BACKOFF_MAX_S": "10", "CALLBACK_TIMEOUT_S": "5"})
    finished = add_job(db, ["done"])
    add_job(db, ["queued"])
    fresh = add_job(db, ["done"], finished_ago_s=5)
    silent = add_job(db, ["done"], finished_ago_s=3600)
    retried = add_job(db, ["done"], finished_ago_s=3600)
    with db.begin() as session:
        session.execute(update(Job).where(Job.id.in_([fresh, silent, retried])).values(callback_state="pending"))
        session.add(CallbackDelivery(job_id=retried, attempt=1, status="failed", created_at=utcnow() - timedelta(seconds=2)))
    app = Recorder()
    assert sweep_callbacks(db, app, settings) == 2
    assert sorted(app.sent) == sorted([(CALLBACK_TASK, finished, "seg-callbacks"), (CALLBACK_TASK, silent, "seg-callbacks")])
    app.sent.clear()
    assert sweep_callbacks(db, app, settings, stale_s=3600 * 24) == 0 and app.sent == []


def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    body = b'{"job_id":"j"}'
    expected = hmac.new(b"whsec_k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature("whsec_k", "1700000000", body) == "sha256=" + expected
    assert signature("whsec_k", "1700000001", body) != signature("whsec_k", "1700000000", body)
