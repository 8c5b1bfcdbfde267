"""Job status and progress, derived from the image rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from db.models import CANCELLED, DONE, FAILED, IMAGE_STATUSES, PROCESSING, QUEUED, Image, Job, JobPart, utcnow


@dataclass
class JobProgress:
    counts: dict[str, int]
    status: str
    total: int
    finished: int
    progress: float  # finished / total, in [0, 1]
    started_at: datetime | None
    finished_at: datetime | None
    model_versions: list[str]


RECEIVING = "receiving"
FINISHED = ("done", "done_with_errors", "cancelled")


def job_status(counts: dict[str, int], cancelled: bool, closed: bool = True) -> str:
    """receiving | queued | processing | done | done_with_errors | cancelled.

    A job opened for parts is "receiving" until it is closed, whatever its images' states: more may
    come. (Cancelling closes it.)"""
    unfinished = counts.get(QUEUED, 0) + counts.get(PROCESSING, 0)
    if cancelled and unfinished == 0:
        return "cancelled"
    if not closed:
        return RECEIVING
    if unfinished:
        started = counts.get(PROCESSING, 0) + counts.get(DONE, 0) + counts.get(FAILED, 0)
        return "processing" if started else QUEUED
    if counts.get(FAILED, 0):
        return "done_with_errors"
    return DONE


def job_progress(session: Session, job: Job) -> JobProgress:
    rows = session.execute(
        select(Image.status, func.count(), func.min(Image.started_at), func.max(Image.finished_at))
        .where(Image.job_id == job.id)
        .group_by(Image.status)
    ).all()
    counts = {s: 0 for s in IMAGE_STATUSES}
    started, finished_at = [], []
    for status, n, first_start, last_finish in rows:
        counts[status] = n
        if first_start:
            started.append(first_start)
        if last_finish:
            finished_at.append(last_finish)
    total = sum(counts.values())
    finished = counts[DONE] + counts[FAILED] + counts[CANCELLED]
    status = job_status(counts, job.cancelled_at is not None, not job.receiving)
    versions = session.scalars(
        select(Image.model_version).where(Image.job_id == job.id, Image.model_version.is_not(None)).distinct()
    ).all()
    return JobProgress(
        counts=counts,
        status=status,
        total=total,
        finished=finished,
        progress=(finished / total) if total else 1.0,
        started_at=min(started) if started else None,
        finished_at=max(finished_at) if finished_at and status in FINISHED else None,
        model_versions=sorted(versions),
    )


# A job opened for parts with a callback URL holds its callback_state at this, not NULL, until it is
# closed: code from before parts (a worker or reconciler not yet upgraded) claims a callback only from
# NULL, so it cannot announce a batch that is still arriving. Shown as "waiting" (api/callbacks.py).
CALLBACK_HELD = "receiving"


def closing(cancel: bool = False) -> dict:
    """The values of the one UPDATE that closes a job receiving parts (always with
    `WHERE receiving`: whoever closes it first wins, and the row's lock makes a close wait for a part
    still committing). `cancel`: the batch was cut short, so the job ends "cancelled"."""
    now = utcnow()
    values = {
        "receiving": False,
        "closed_at": now,
        "callback_state": case((Job.callback_state == CALLBACK_HELD, None), else_=Job.callback_state),
    }
    if cancel:
        values["cancelled_at"] = func.coalesce(Job.cancelled_at, now)
    return values


def close_job(session: Session, job_id: str, cancel: bool = False) -> bool:
    """Close (or with `cancel`, cut short) a job receiving parts; False when it was not receiving."""
    closed = session.execute(
        update(Job).where(Job.id == job_id, Job.receiving.is_(True)).values(**closing(cancel))
        .returning(Job.id).execution_options(synchronize_session=False)
    ).scalar()
    return closed is not None


def close_idle_jobs(session: Session, idle_hours: float) -> list[str]:
    """Cut short the jobs opened for parts that got no part (nor were made) in the last `idle_hours`:
    their client died, or gave up, before closing them, so the batch is not known to be whole. They
    end "cancelled" (what is still queued is cancelled, what was processed stays), and their callbacks
    fire. `idle_hours` <= 0: never. Returns their ids (for the reconciler's round)."""
    if idle_hours <= 0:
        return []
    cutoff = utcnow() - timedelta(hours=idle_hours)

    def idle():
        recent_part = select(JobPart.id).where(JobPart.job_id == Job.id, JobPart.created_at >= cutoff).exists()
        return (Job.receiving.is_(True), Job.created_at < cutoff, ~recent_part)

    # Lock the candidates first (PostgreSQL; SQLite has one writer anyway), skipping a job whose part
    # is committing right now: the UPDATE below then reads the parts afresh with the rows held, so a
    # part accepted a moment ago keeps its job open.
    candidates = session.scalars(select(Job.id).where(*idle()).with_for_update(skip_locked=True)).all()
    ids: list[str] = []
    for start in range(0, len(candidates), 500):
        batch = list(candidates[start : start + 500])
        closed = list(session.execute(
            update(Job).where(Job.id.in_(batch), *idle()).values(**closing(cancel=True))
            .returning(Job.id).execution_options(synchronize_session=False)
        ).scalars())
        if closed:
            session.execute(
                update(Image).where(Image.job_id.in_(closed), Image.status == QUEUED)
                .values(status=CANCELLED, finished_at=utcnow()).execution_options(synchronize_session=False)
            )
        ids += closed
    return ids
