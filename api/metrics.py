"""GET /metrics: Prometheus text format (no API key; keep it inside the cluster).

Every number is read at scrape time from the SQL database (the source of
truth), the worker heartbeat rows and the broker, so any API process, of any
number behind a load balancer, answers the same, and nothing is lost when a
process restarts. No tenant, job or image id ever becomes a label.

| metric | type | what |
|---|---|---|
| bonedetect_up{component} | gauge | 1 if the database / broker answered this scrape |
| bonedetect_queue_depth{queue} | gauge | chunk tasks waiting in the broker (what KEDA scales on) |
| bonedetect_images{status} | gauge | images now queued / processing (all statuses, from SQL) |
| bonedetect_images_done_total | counter | images segmented |
| bonedetect_images_failed_total{reason} | counter | images failed, by a bounded set of reasons |
| bonedetect_image_processing_seconds | histogram | per image: decode to statistics, in the worker |
| bonedetect_job_duration_seconds | histogram | per finished job: submission to last image finished |
| bonedetect_workers_alive | gauge | workers with a heartbeat younger than HEARTBEAT_STALE_S |
| bonedetect_model_info{model_version} | gauge | alive workers serving each model version |
| bonedetect_worker_*{worker} | gauges, counter | per alive worker: images done, last chunk size, peak GPU memory, heartbeat age |

Counters are counts of rows, so deleting old rows (retention) lowers them;
Prometheus treats that as a counter reset. The two histograms scan the
finished rows once per scrape: one aggregate query each.
"""

from __future__ import annotations

import logging
from collections import Counter

from flask import Blueprint, Response, request
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from api import Services, services
from api.health import alive_workers, broker_queue_depth
from db.models import CANCELLED, DONE, FAILED, IMAGE_STATUSES, UNFINISHED, Image, Job

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

IMAGE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
JOB_BUCKETS_S = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)

# Why images fail, in a fixed set of labels: the first rule whose words appear in the error wins.
FAILURE_REASONS = (
    ("internal", ("internal error",)),
    ("unreadable_blob", ("could not read the uploaded file",)),
    ("truncated", ("truncated",)),
    ("too_large", ("above the limit",)),
    ("too_small", ("smaller than the minimum",)),
    ("empty_file", ("empty file",)),
    ("unsupported", ("unsupported", "not supported", "no decoder installed", "not installed")),
    ("undecodable", ("not a decodable image", "not a readable dicom", "dicom", "could not be decoded")),
    ("postprocessing", ("postprocessing failed",)),
)
FAILURE_LABELS = (*(label for label, _ in FAILURE_REASONS), "other")


def failure_reason(error: str | None) -> str:
    """One of FAILURE_LABELS for an image's error text."""
    text = (error or "").lower()
    for label, words in FAILURE_REASONS:
        if any(w in text for w in words):
            return label
    return "other"


def _histogram(name: str, doc: str, buckets: tuple, counts: list[int], total: int, sum_s: float):
    """A HistogramMetricFamily from cumulative bucket counts (one per bucket bound) and the total."""
    pairs = [(repr(float(b)), int(c)) for b, c in zip(buckets, counts, strict=True)]
    return HistogramMetricFamily(name, doc, buckets=[*pairs, ("+Inf", int(total))], sum_value=float(sum_s))


class SystemCollector:
    """Collects every metric from SQL and the broker at scrape time."""

    def __init__(self, svc: Services):
        self.svc = svc

    def collect(self):
        up = GaugeMetricFamily("bonedetect_up", "1 if the component answered this scrape", labels=["component"])
        try:
            with self.svc.sessionmaker() as session:
                families = list(self._sql(session))
            up.add_metric(["database"], 1)
        except Exception as err:
            log.warning("metrics: database unavailable: %s", err)
            families = []
            up.add_metric(["database"], 0)
        queue = self.svc.settings.queue_name
        depth = GaugeMetricFamily(
            "bonedetect_queue_depth", "chunk tasks waiting in the broker queue", labels=["queue"]
        )
        try:
            depth.add_metric([queue], broker_queue_depth(self.svc.settings))
            up.add_metric(["broker"], 1)
            families.append(depth)
        except Exception as err:
            log.warning("metrics: broker unavailable: %s", err)
            up.add_metric(["broker"], 0)
        yield up
        yield from families

    def _sql(self, session: Session):
        yield from self._images(session)
        yield self._image_latency(session)
        yield self._job_latency(session)
        yield from self._workers(session)

    def _images(self, session: Session):
        counts = dict.fromkeys(IMAGE_STATUSES, 0)
        counts.update({status: n for status, n in session.execute(select(Image.status, func.count()).group_by(Image.status))})
        by_status = GaugeMetricFamily("bonedetect_images", "images by current status", labels=["status"])
        for status in IMAGE_STATUSES:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        yield CounterMetricFamily("bonedetect_images_done", "images segmented", value=counts.get(DONE, 0))
        reasons = Counter(dict.fromkeys(FAILURE_LABELS, 0))
        errors = session.execute(select(Image.error, func.count()).where(Image.status == FAILED).group_by(Image.error))
        for error, n in errors:
            reasons[failure_reason(error)] += n
        failed = CounterMetricFamily("bonedetect_images_failed", "images failed, by reason", labels=["reason"])
        for label in FAILURE_LABELS:
            failed.add_metric([label], reasons[label])
        yield failed

    def _image_latency(self, session: Session):
        ms = Image.processing_ms
        finished = and_(Image.status.in_((DONE, FAILED)), ms.is_not(None))
        columns = [func.sum(case((ms <= b * 1000.0, 1), else_=0)) for b in IMAGE_BUCKETS_S]
        row = session.execute(select(func.count(), func.coalesce(func.sum(ms), 0.0), *columns).where(finished)).one()
        total, sum_ms, *counts = row
        return _histogram(
            "bonedetect_image_processing_seconds",
            "time the worker spent on one image (decode, network share, statistics, encoding)",
            IMAGE_BUCKETS_S, [c or 0 for c in counts], total or 0, (sum_ms or 0.0) / 1000.0,
        )  # fmt: skip

    def _job_latency(self, session: Session):
        unfinished = func.sum(case((Image.status.in_(UNFINISHED), 1), else_=0))
        rows = session.execute(
            select(Job.created_at, func.max(Image.finished_at))
            .join(Image, Image.job_id == Job.id)
            .where(Job.cancelled_at.is_(None), Job.receiving.is_(False), Image.status != CANCELLED)
            .group_by(Job.id, Job.created_at)
            .having(unfinished == 0)
        ).all()
        durations = []
        for created, finished in rows:
            if created is None or finished is None:
                continue
            if (created.tzinfo is None) != (finished.tzinfo is None):  # SQLite: both naive UTC
                created, finished = created.replace(tzinfo=None), finished.replace(tzinfo=None)
            durations.append(max(0.0, (finished - created).total_seconds()))
        counts = [sum(d <= b for d in durations) for b in JOB_BUCKETS_S]
        return _histogram(
            "bonedetect_job_duration_seconds",
            "finished jobs: from submission to the last image finished (cancelled jobs excluded)",
            JOB_BUCKETS_S, counts, len(durations), sum(durations),
        )  # fmt: skip

    def _workers(self, session: Session):
        workers = alive_workers(session, self.svc.settings.heartbeat_stale_s)
        yield GaugeMetricFamily(
            "bonedetect_workers_alive", "workers with a recent heartbeat", value=len(workers)
        )
        models = GaugeMetricFamily(
            "bonedetect_model_info", "alive workers with this model loaded", labels=["model_version"]
        )
        for version, n in sorted(Counter(w.model_version for w in workers if w.model_version).items()):
            models.add_metric([version], n)
        yield models
        info = GaugeMetricFamily(
            "bonedetect_worker_info", "1 per alive worker: its device and model", labels=["worker", "device", "model_version"]
        )
        done = CounterMetricFamily("bonedetect_worker_images_done", "images this worker process segmented", labels=["worker"])
        batch = GaugeMetricFamily("bonedetect_worker_last_batch_size", "images in the worker's last chunk", labels=["worker"])
        gpu = GaugeMetricFamily("bonedetect_worker_gpu_memory_mb", "peak GPU memory allocated by the worker (MiB)", labels=["worker"])
        age = GaugeMetricFamily("bonedetect_worker_heartbeat_age_seconds", "seconds since the worker's last heartbeat", labels=["worker"])
        for w in workers:
            info.add_metric([w.hostname, w.device or "", w.model_version or ""], 1)
            done.add_metric([w.hostname], w.images_done)
            age.add_metric([w.hostname], round(w.age_s, 3))
            if w.last_batch_size is not None:
                batch.add_metric([w.hostname], w.last_batch_size)
            if w.gpu_memory_mb is not None:
                gpu.add_metric([w.hostname], w.gpu_memory_mb)
        yield from (info, done, batch, gpu, age)


@bp.get("/metrics")
def metrics():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SystemCollector(services()))
    # The classic text format (version 0.0.4) unless the scraper asks for OpenMetrics.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(registry), content_type=content_type)
