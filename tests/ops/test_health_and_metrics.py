"""/readyz, /metrics, the worker heartbeat row and the page's routes, on the
API with a real migrated SQLite database (no worker process: tests/ops/
test_ops_system.py runs the whole system)."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from api import create_app
from api.metrics import FAILURE_LABELS, failure_reason
from bonedetect.formats import UNSUPPORTED
from bonedetect.settings import Settings
from db.models import WorkerHeartbeat, utcnow
from tests.api.conftest import build_api, jpeg_bytes, png_bytes

STATIC = Path(__file__).resolve().parents[2] / "api" / "static"


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def embedded_api(tmp_path):
    """The API with the embedded broker (kombu on a SQLite file), which answers without a server."""
    built = build_api(tmp_path, f"sqlite:///{tmp_path / 'bd.sqlite'}", BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    yield built
    built.close()


def add_heartbeat(api, hostname: str, model_version: str | None, age_s: float) -> None:
    with api.sessions.begin() as session:
        now = utcnow()
        session.add(
            WorkerHeartbeat(
                hostname=hostname, model_version=model_version, device="cpu", started_at=now - timedelta(seconds=age_s),
                last_seen_at=now - timedelta(seconds=age_s), images_done=7, last_batch_size=16,
            )
        )  # fmt: skip


# -- /readyz -----------------------------------------------------------------------------


def test_readyz_names_each_unreachable_dependency(tmp_path):
    settings = Settings.from_env(
        {
            "BONEDETECT_HOME": str(tmp_path),
            "DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/bonedetect",
            "BROKER_URL": "redis://127.0.0.1:1/0",
        }
    )
    client = create_app(settings, enqueue=lambda ids: None).test_client()
    resp = client.get("/readyz")
    assert resp.status_code == 503 and int(resp.headers["Retry-After"]) > 0
    assert resp.json["checks"]["database"] == {"ok": False, "error": "database unavailable"}
    assert resp.json["checks"]["broker"] == {"ok": False, "error": "broker unavailable"}
    assert "database unavailable" in resp.json["error"] and "broker unavailable" in resp.json["error"]
    assert client.get("/healthz").json == {"status": "ok"}


def test_readyz_counts_only_fresh_workers_with_a_loaded_model(embedded_api):
    api = embedded_api
    stale = api.settings.heartbeat_stale_s
    add_heartbeat(api, "gone@gpu1", "m-1", age_s=stale + 5)  # crashed: row left behind
    add_heartbeat(api, "loading@gpu2", None, age_s=1)  # alive, model still loading
    resp = api.client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json["checks"]["workers"] == {"ok": False, "alive": 1, "with_model": 0, "model_versions": []}
    assert "(1 alive, still loading)" in resp.json["error"]

    add_heartbeat(api, "ok@gpu3", "m-2", age_s=1)
    resp = api.client.get("/readyz")
    assert resp.status_code == 200 and resp.json["status"] == "ready"
    assert resp.json["checks"]["workers"] == {"ok": True, "alive": 2, "with_model": 1, "model_versions": ["m-2"]}
    assert resp.json["checks"]["broker"] == {"ok": True, "queue_depth": 0}


def test_probes_on_the_embedded_broker_give_their_connections_back(embedded_api):
    """Orchestrators probe every few seconds: 40 probes must not hold 40 pooled broker connections.

    kombu's SQLAlchemy transport left each probe's session open until the garbage collector ran; with the
    collector paused (as it can be for long stretches in a quiet API process), the 16th probe waited 30 s
    for a connection and the broker check failed.
    """
    import gc

    import kombu.transport.sqlalchemy as kombu_sqla

    broker_url = embedded_api.settings.broker_url  # sqla+sqlite:///...: kombu keys its engines by the part after +
    gc.disable()
    try:
        for path in ("/readyz", "/metrics") * 20:
            assert embedded_api.client.get(path).status_code in (200, 503)
            engine, _ = kombu_sqla.Channel._engines[broker_url.split("+", 1)[1]]
            assert engine.pool.checkedout() == 0, f"after {path}: {engine.pool.status()}"
    finally:
        gc.enable()
    resp = embedded_api.client.get("/readyz")
    assert resp.json["checks"]["broker"] == {"ok": True, "queue_depth": 0}


# -- /metrics ------------------------------------------------------------------------------


def test_metrics_answer_with_the_database_and_broker_down(tmp_path):
    settings = Settings.from_env(
        {
            "BONEDETECT_HOME": str(tmp_path),
            "DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/bonedetect",
            "BROKER_URL": "redis://127.0.0.1:1/0",
        }
    )
    resp = create_app(settings, enqueue=lambda ids: None).test_client().get("/metrics")
    assert resp.status_code == 200, "a scrape still answers, so the outage shows as a value"
    m = metric_values(resp.get_data(as_text=True))
    assert m[("bonedetect_up", (("component", "database"),))] == 0
    assert m[("bonedetect_up", (("component", "broker"),))] == 0


def test_metrics_of_submitted_work_and_workers(embedded_api):
    api = embedded_api
    resp = api.submit([("a.png", png_bytes()), ("b.jpg", jpeg_bytes()), ("c.txt", b"hello")])
    assert resp.status_code == 202
    add_heartbeat(api, "w1@gpu1", "m-1", age_s=2)
    add_heartbeat(api, "old@gpu9", "m-0", age_s=api.settings.heartbeat_stale_s + 60)
    text = api.client.get("/metrics").get_data(as_text=True)
    m = metric_values(text)
    assert m[("bonedetect_images", (("status", "queued"),))] == 2
    assert m[("bonedetect_images", (("status", "failed"),))] == 1
    assert m[("bonedetect_images_failed_total", (("reason", "unsupported"),))] == 1
    assert {labels[0][1] for (name, labels) in m if name == "bonedetect_images_failed_total"} == set(FAILURE_LABELS)
    assert m[("bonedetect_images_done_total", ())] == 0
    assert m[("bonedetect_workers_alive", ())] == 1, "the stale row does not count"
    assert m[("bonedetect_model_info", (("model_version", "m-1"),))] == 1
    assert ("bonedetect_model_info", (("model_version", "m-0"),)) not in m
    assert m[("bonedetect_worker_last_batch_size", (("worker", "w1@gpu1"),))] == 16
    assert m[("bonedetect_job_duration_seconds_count", ())] == 0, "the job is not finished"
    assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", text), "no job, image or tenant id becomes a label"


def test_every_known_error_maps_to_a_named_reason():
    known = {
        "internal error after 6 attempts: boom": "internal",
        "could not read the uploaded file: timeout": "unreadable_blob",
        "not a decodable image: truncated file (image file is truncated)": "truncated",
        "not a readable DICOM file: truncated file": "truncated",
        "image is 20000x20000 pixels, above the limit of 100000000 pixels": "too_large",
        "image is 4x4 pixels, smaller than the minimum of 16 pixels per side": "too_small",
        "empty file": "empty_file",
        UNSUPPORTED: "unsupported",
        "unsupported DICOM transfer syntax JPEG XL (1.2.3); supported: ...": "unsupported",
        "multi-frame DICOM (3 frames) is not supported: send one radiograph per file": "unsupported",
        "no decoder installed on this worker for DICOM transfer syntax JPEG 2000": "unsupported",
        "not a decodable image: unreadable header": "undecodable",
        "DICOM file has no pixel data": "undecodable",
        "postprocessing failed: out of memory": "postprocessing",
        "something nobody expected": "other",
        None: "other",
    }
    assert {error: failure_reason(error) for error in known} == known
    assert set(known.values()) <= set(FAILURE_LABELS)


# -- the worker's heartbeat row ---------------------------------------------------------------------


def test_heartbeat_row_lives_and_dies_with_the_worker(embedded_api):
    from worker.heartbeat import Heartbeat, ModelInfo

    api = embedded_api
    beat = Heartbeat(api.settings, "w@host", sessions=api.sessions)
    beat.beat(reset=True)
    beat.model = ModelInfo("m-7", "cpu")
    beat.chunk_done(images_done=5, batch_size=8)
    beat.chunk_done(images_done=3, batch_size=3)
    with api.sessions() as session:
        row = session.scalar(select(WorkerHeartbeat))
    assert (row.hostname, row.model_version, row.device) == ("w@host", "m-7", "cpu")
    assert (row.images_done, row.last_batch_size, row.gpu_memory_mb) == (8, 3, None)
    assert api.client.get("/readyz").json["checks"]["workers"]["model_versions"] == ["m-7"]

    restarted = Heartbeat(api.settings, "w@host", sessions=api.sessions)  # same node name, new process
    restarted.beat(reset=True)
    with api.sessions() as session:
        assert session.scalar(select(WorkerHeartbeat.images_done)) == 0, "a new process counts from zero"
    restarted.stop(delete=True)
    with api.sessions() as session:
        assert session.scalar(select(WorkerHeartbeat)) is None
    assert api.client.get("/readyz").status_code == 503


# -- the page and the original image -------------------------------------------------------


def test_page_is_served_at_the_root_with_only_local_assets(api):
    resp = api.client.get("/")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    assert "Bone Detect" in html and "not for clinical use" in html
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        assert api.client.get(asset).status_code == 200, asset
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://", text), f"{path.name} refers to another origin"
    assert api.client.get("/v1").json["endpoints"]["GET /"] == "the web page"


def test_source_route_serves_the_upload_to_its_tenant_only(api):
    png = png_bytes(seed=3)
    job = api.submit([("scan 1.png", png), ("x.txt", b"text")]).json
    images = api.get(f"/v1/jobs/{job['job_id']}/images").json["images"]
    good, bad = images
    resp = api.get(f"/v1/images/{good['image_id']}/source")
    assert resp.status_code == 200 and resp.data == png and resp.mimetype == "image/png"
    assert resp.headers["Content-Disposition"] == "inline; filename*=UTF-8''scan%201.png"
    assert api.get(f"/v1/images/{good['image_id']}/source", tenant="b").status_code == 404
    assert api.client.get(f"/v1/images/{good['image_id']}/source").status_code == 401
    refused = api.get(f"/v1/images/{bad['image_id']}/source")
    assert refused.status_code == 409 and "not stored" in refused.json["error"]
