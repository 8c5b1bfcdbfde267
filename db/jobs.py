"""Job status and progress, derived from the image rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import CANCELLED, DONE, FAILED, IMAGE_STATUSES, PROCESSING, QUEUED, Image, Job


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


def job_status(counts: dict[str, int], cancelled: bool) -> str:
    """queued | processing | done | done_with_errors | cancelled."""
    unfinished = counts.get(QUEUED, 0) + counts.get(PROCESSING, 0)
    if cancelled and unfinished == 0:
        return "cancelled"
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
    status = job_status(counts, job.cancelled_at is not None)
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
        finished_at=max(finished_at) if finished_at and status in ("done", "done_with_errors", "cancelled") else None,
        model_versions=sorted(versions),
    )
