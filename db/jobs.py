"""Job status and progress, derived from the image rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
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


def close_idle_jobs(session: Session, idle_hours: float) -> list[str]:
    """Close the jobs opened for parts that got no part (nor were made) in the last `idle_hours`: a
    client that died before its close. Their images finish, and their callbacks fire, as if the client
    had closed them. Returns their ids (for the reconciler's round)."""
    cutoff = utcnow() - timedelta(hours=idle_hours)
    recent_part = select(JobPart.id).where(JobPart.job_id == Job.id, JobPart.created_at >= cutoff).exists()
    return list(session.execute(
        update(Job)
        .where(Job.receiving.is_(True), Job.created_at < cutoff, ~recent_part)
        .values(receiving=False, closed_at=utcnow())
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).scalars())
