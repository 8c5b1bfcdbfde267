"""Readiness, metrics, JSON logs and the S3 blob store on the real system in its
scale-out shape: PostgreSQL, Redis, an S3-protocol server (moto), the API on a
socket and a Celery worker process.

One job (three radiographs, one truncated JPEG, one text file) runs once for
the module; each test checks what an operator would look at afterwards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen
from urllib.error import HTTPError

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.services import wait_for
from bonedetect.client import Client
from bonedetect.local import serve_api, start_worker, stop_process
from bonedetect.logs import JsonFormatter
from bonedetect.settings import Settings
from tests.integration.conftest import PG_ADMIN, REDIS_HOST, REDIS_PORT, need, synthetic_jpegs
from tests.ops.conftest import S3_ENV

pytestmark = pytest.mark.integration


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urlopen(url, timeout=30) as resp:
            return resp.status, json.load(resp)
    except HTTPError as err:
        return err.code, json.load(err)


def samples(metrics_text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} from Prometheus text."""
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@dataclass
class FinishedJob:
    settings: Settings
    api_url: str
    client: Client
    job: dict
    images: list[dict]
    ready_after_s: float
    readyz: dict
    metrics: str
    api_log: list[dict]
    worker_log: list[dict]
    worker_log_text: str
    bucket: str
    s3: object
    local_blobs: Path


@pytest.fixture(scope="module")
def finished(s3_server, tmp_path_factory):
    need("127.0.0.1", 5432, "PostgreSQL")
    need(REDIS_HOST, REDIS_PORT, "Redis")
    import boto3
    from sqlalchemy import create_engine, text

    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker
    from db.tenants import create_tenant

    tmp = tmp_path_factory.mktemp("ops")
    db_name = f"bd_test_ops_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    bucket = f"bd-ops-{uuid.uuid4().hex[:10]}"
    s3_env = {**S3_ENV, "S3_ENDPOINT_URL": s3_server}
    mp = pytest.MonkeyPatch()
    for key, value in s3_env.items():
        mp.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=bucket)
    settings = Settings.from_env(
        {
            **os.environ,
            "BONEDETECT_HOME": str(tmp / "var"),
            "DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0] + f"/{db_name}",
            "BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
            "BLOB_URL": f"s3://{bucket}/blobs",
            "QUEUE_NAME": f"segment-ops-{uuid.uuid4().hex[:8]}",
            "CHUNK_SIZE": "4",
            "INFER_BATCH_SIZE": "4",
            "TORCH_THREADS": "1",
        }
    )
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine).begin() as session:
        key = create_tenant(session, "hospital-ops")[1]
    engine.dispose()

    api = serve_api(settings)
    api_log = io.StringIO()  # the API's own JSON lines, as its handler writes them
    capture = logging.StreamHandler(api_log)
    capture.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(capture)
    worker_log = tmp / "worker.log"
    worker = None
    try:
        assert get_json(api.url + "/readyz")[0] == 503, "no worker yet: not ready"
        t0 = time.monotonic()
        worker = start_worker(settings, name=f"ops-{uuid.uuid4().hex[:6]}", log_path=worker_log, HEARTBEAT_INTERVAL_S="1")
        wait_for(lambda: get_json(api.url + "/readyz")[0] == 200, 120, "/readyz to answer 200")
        ready_after = time.monotonic() - t0

        client = Client(api.url, key)
        files, _ = synthetic_jpegs(3, seed=21)
        files += [("cut.jpg", files[0][1][: len(files[0][1]) // 3]), ("notes.txt", b"not a radiograph\n")]
        job = client.wait(client.submit(files, label="ops")["job_id"], timeout=300)
        images = list(client.images(job["job_id"]))

        def bookkept() -> str | None:
            """/metrics once the worker's chunk bookkeeping (per-image lines, then heartbeat) followed its results."""
            logged = sum(1 for r in json_lines(worker_log.read_text()) if r.get("msg", "").startswith("image "))
            with urlopen(api.url + "/metrics", timeout=30) as resp:
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4"), "the classic format by default"
                text = resp.read().decode()
            done = [v for (name, _), v in samples(text).items() if name == "bonedetect_worker_images_done_total"]
            return text if logged == 4 and done == [3] else None

        metrics = wait_for(bookkept, 30, "the worker's chunk bookkeeping")
        readyz = get_json(api.url + "/readyz")[1]
        yield FinishedJob(
            settings, api.url, client, job, images, ready_after, readyz, metrics,
            json_lines(api_log.getvalue()), json_lines(worker_log.read_text()), worker_log.read_text(),
            bucket, s3, tmp / "var" / "blobs",
        )  # fmt: skip
    finally:
        logging.getLogger().removeHandler(capture)
        if worker is not None:
            stop_process(worker)
        api.stop()
        mp.undo()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()


def test_job_reaches_done_with_errors_on_the_scale_out_configuration(finished):
    assert finished.job["status"] == "done_with_errors"
    assert finished.job["counts"]["done"] == 3 and finished.job["counts"]["failed"] == 2
    print(f"worker ready {finished.ready_after_s:.1f} s after its process started")


def test_readyz_reports_database_broker_and_the_workers_model(finished):
    ready = finished.readyz
    assert ready["status"] == "ready"
    assert ready["checks"]["database"] == {"ok": True}
    assert ready["checks"]["broker"] == {"ok": True, "queue_depth": 0}
    workers = ready["checks"]["workers"]
    assert workers["ok"] and workers["alive"] == 1 and workers["with_model"] == 1
    assert workers["model_versions"] == finished.job["model_versions"]


def test_metrics_count_images_by_outcome_and_reason(finished):
    m = samples(finished.metrics)
    assert m[("bonedetect_up", (("component", "database"),))] == 1
    assert m[("bonedetect_up", (("component", "broker"),))] == 1
    assert m[("bonedetect_queue_depth", (("queue", finished.settings.queue_name),))] == 0
    assert m[("bonedetect_images_done_total", ())] == 3
    failed = {labels[0][1]: v for (name, labels), v in m.items() if name == "bonedetect_images_failed_total"}
    assert failed.pop("truncated") == 1, "the truncated JPEG"
    assert failed.pop("unsupported") == 1, "the text file, refused at upload"
    assert set(failed.values()) == {0}, failed
    assert m[("bonedetect_images", (("status", "queued"),))] == 0
    assert m[("bonedetect_images", (("status", "done"),))] == 3


def test_metrics_latency_histograms_match_the_rows(finished):
    m = samples(finished.metrics)
    timed = [im["processing_ms"] for im in finished.images if im["processing_ms"] is not None]
    n = len(timed)
    assert n >= 3, "every segmented image is timed"
    assert m[("bonedetect_image_processing_seconds_count", ())] == n
    assert m[("bonedetect_image_processing_seconds_sum", ())] == pytest.approx(sum(timed) / 1000, rel=1e-6)
    slowest = max(timed) / 1000
    inf = m[("bonedetect_image_processing_seconds_bucket", (("le", "+Inf"),))]
    buckets = {
        float(labels[0][1]): v
        for (name, labels), v in m.items()
        if name == "bonedetect_image_processing_seconds_bucket" and labels[0][1] != "+Inf"
    }
    assert inf == n and all(v == n for le, v in buckets.items() if le >= slowest)
    assert all(v < n for le, v in buckets.items() if le < slowest)

    from datetime import datetime

    job = finished.job
    took = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["created_at"])).total_seconds()
    assert m[("bonedetect_job_duration_seconds_count", ())] == 1
    assert m[("bonedetect_job_duration_seconds_sum", ())] == pytest.approx(took, abs=0.01)


def test_metrics_show_the_worker_its_model_and_batch(finished):
    m = samples(finished.metrics)
    version = finished.job["model_versions"][0]
    assert m[("bonedetect_workers_alive", ())] == 1
    assert m[("bonedetect_model_info", (("model_version", version),))] == 1
    (worker,) = [dict(labels)["worker"] for (name, labels), _ in m.items() if name == "bonedetect_worker_info"]
    assert m[("bonedetect_worker_info", (("device", "cpu"), ("model_version", version), ("worker", worker)))] == 1
    assert m[("bonedetect_worker_images_done_total", (("worker", worker),))] == 3
    assert m[("bonedetect_worker_last_batch_size", (("worker", worker),))] == 4, "one chunk of the four stored files"
    assert m[("bonedetect_worker_heartbeat_age_seconds", (("worker", worker),))] < 10
    assert not any(name == "bonedetect_worker_gpu_memory_mb" for name, _ in m), "no GPU, no GPU memory sample"


def test_json_logs_follow_each_image_from_the_api_to_the_worker(finished):
    job_id = finished.job["job_id"]
    (submitted,) = [r for r in finished.api_log if r.get("path") == "/v1/jobs" and r.get("method") == "POST"]
    assert submitted["job_id"] == job_id and submitted["status"] == 202 and submitted["accepted"] == 4
    assert submitted["request_id"] and submitted["tenant_id"]

    by_image = {r["image_id"]: r for r in finished.worker_log if r.get("msg", "").startswith(("image done", "image failed"))}
    for im in finished.images:
        if im["filename"] == "notes.txt":
            assert im["image_id"] not in by_image, "refused at upload: the worker never saw it"
            continue
        line = by_image[im["image_id"]]
        assert line["job_id"] == job_id and line["status"] == im["status"]
        if im["status"] == "done":
            assert line["area_px"] == im["area_px"] and line["level"] == "INFO"
        else:
            assert line["level"] == "WARNING" and line["error"] == im["error"]
    chunk_lines = [r for r in finished.worker_log if r.get("msg", "").startswith("chunk done")]
    assert chunk_lines and chunk_lines[0]["job_id"] == job_id, "the task's own lines carry the chunk's job id"
    assert len(chunk_lines[0]["image_ids"]) == 4
    # how well the network was fed, for ops: its share of the chunk's time and where the rest went
    chunk = chunk_lines[0]
    assert chunk["images"] == 4 and chunk["done"] == 3 and 0 < chunk["pipeline_s"] <= chunk["seconds"]
    assert 0 < chunk["network_share"] <= 1
    assert chunk["input_wait_s"] >= 0 and chunk["finish_wait_s"] >= 0 and chunk["database_s"] >= 0
    waits = chunk["network_share"] * chunk["pipeline_s"] + chunk["input_wait_s"] + chunk["finish_wait_s"]
    assert waits <= chunk["pipeline_s"] + 0.01
    assert chunk["pipeline_s"] + chunk["database_s"] == pytest.approx(chunk["seconds"], abs=0.002)
    assert {by_image[i]["task_id"] for i in chunk_lines[0]["image_ids"]} == {chunk_lines[0]["task_id"]}
    assert "Traceback" not in finished.worker_log_text


def test_blobs_of_the_job_are_objects_in_the_bucket(finished):
    pages = finished.s3.get_paginator("list_objects_v2").paginate(Bucket=finished.bucket)
    keys = {o["Key"] for page in pages for o in page.get("Contents", [])}
    job_id = finished.job["job_id"]
    for im in finished.images:
        base = next((k.rsplit("/", 1)[0] for k in keys if f"/jobs/{job_id}/{im['image_id']}/" in k), None)
        if im["filename"] == "notes.txt":
            assert base is None, "a refused file stores nothing"
            continue
        assert base and base.startswith("blobs/tenants/")
        expected = {"source"} | ({"mask.png"} if im["status"] == "done" else set())  # overlays: on request
        assert {k.rsplit("/", 1)[1] for k in keys if k.startswith(base + "/")} == expected
        if im["status"] == "done":
            obj = finished.s3.get_object(Bucket=finished.bucket, Key=f"{base}/mask.png")["Body"].read()
            assert finished.client.mask_png(im["image_id"]) == obj, "the API serves the object from the bucket"
            overlay = finished.client.overlay_png(im["image_id"])  # rendered by the API, then kept in the bucket
            kept = finished.s3.get_object(Bucket=finished.bucket, Key=f"{base}/overlay.png")["Body"].read()
            assert kept == overlay == finished.client.overlay_png(im["image_id"])
    assert not finished.local_blobs.exists(), "nothing was written to a local folder"


# -- readiness follows the workers -------------------------------------------------------------


def test_readyz_follows_a_worker_from_start_to_crash(start_system, tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTBEAT_INTERVAL_S", "1")
    monkeypatch.setenv("HEARTBEAT_STALE_S", "4")
    system = start_system(f"sqlite:///{tmp_path / 'bd.sqlite'}", f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}", workers=0)
    status, body = get_json(system.api_url + "/readyz")
    assert status == 503 and body["checks"]["database"]["ok"] and body["checks"]["broker"]["ok"]
    assert "no worker with a loaded model seen in the last 4 s" in body["error"]

    worker = start_worker(system.settings, name="ready-test", log_path=tmp_path / "worker0.log")
    system.workers.append(worker)
    body = wait_for(lambda: (r := get_json(system.api_url + "/readyz"))[0] == 200 and r[1], 120, "ready")
    assert body["checks"]["workers"]["with_model"] == 1

    worker.send_signal(signal.SIGKILL)  # no goodbye: its row stays, and goes stale
    worker.wait(10)
    # Wait for the worker check itself: a 503 can also be a moment when the SQLite broker is still
    # locked by the killed process, with the worker's row not yet stale.
    def gone():
        status, body = get_json(system.api_url + "/readyz")
        return status == 503 and body.get("checks", {}).get("workers", {}).get("alive") == 0 and body

    body = wait_for(gone, 15, "not ready, no worker alive")
    assert body["checks"]["workers"]["with_model"] == 0
    assert "no worker with a loaded model" in body["error"]
