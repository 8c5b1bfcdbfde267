"""The whole path with real parts: HTTP upload -> broker -> Celery worker
process -> masks and statistics in SQL -> status, results and CSV over HTTP."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from bonedetect.client import ApiError
from tests.integration.conftest import synthetic_jpegs

pytestmark = pytest.mark.integration


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 1.0 if a.sum() + b.sum() == 0 else 2 * (a & b).sum() / (a.sum() + b.sum())


def check_completed_batch(system, files, truth, expect_failed: dict[str, str] | None = None) -> str:
    """Everything a client would check once a job is finished; returns the job's id."""
    expect_failed = expect_failed or {}
    client = system.client("a")
    job = client.submit(files, label="integration batch", external_ids=[f"acc-{i}" for i in range(len(files))])
    final = client.wait(job["job_id"], timeout=600)

    assert final["status"] == ("done_with_errors" if expect_failed else "done")
    assert final["counts"]["done"] == len(files) - len(expect_failed)
    assert final["counts"]["failed"] == len(expect_failed)
    assert final["counts"]["queued"] == final["counts"]["processing"] == 0
    assert final["progress"] == 1.0
    assert final["model_versions"], "the job records the model version that produced it"

    images = list(client.images(job["job_id"], limit=7))  # several pages
    assert [im["filename"] for im in images] == [name for name, _ in files]
    assert [im["external_id"] for im in images] == [f"acc-{i}" for i in range(len(files))]
    dices = []
    for im in images:
        if im["filename"] in expect_failed:
            assert im["status"] == "failed"
            assert expect_failed[im["filename"]] in im["error"]
            continue
        assert im["status"] == "done", im
        mask = np.array(Image.open(io.BytesIO(client.mask_png(im["image_id"]))))
        gt = truth[im["filename"]]
        assert mask.shape == gt.shape == (im["height"], im["width"]), "mask at the original size"
        assert int((mask > 0).sum()) == im["area_px"]
        overlay = Image.open(io.BytesIO(client.overlay_png(im["image_id"])))
        assert overlay.size == (im["width"], im["height"]) and overlay.mode == "RGB"
        assert im["processing_ms"] > 0 and im["model_version"] in final["model_versions"]
        dices.append(dice(mask, gt))
    # The shipped demo model finds the synthetic lesions (held-out Dice is in model/checkpoints/README.md).
    assert np.mean(dices) > 0.5, f"mean Dice against drawn lesions {np.mean(dices):.3f}"

    rows = list(csv.DictReader(io.StringIO(client.results_csv(job["job_id"]))))
    assert len(rows) == len(files)
    by_name = {r["filename"]: r for r in rows}
    for im in images:
        assert by_name[im["filename"]]["status"] == im["status"]
        if im["status"] == "done":
            assert int(by_name[im["filename"]]["area_px"]) == im["area_px"]
    return job["job_id"]


def test_batch_through_http_redis_and_postgres_reaches_done(start_system, pg_url, redis_url):
    system = start_system(pg_url, redis_url)
    files, truth = synthetic_jpegs(24, seed=11)
    check_completed_batch(system, files, truth)


def test_batch_through_the_embedded_default_reaches_done(start_system, tmp_path):
    system = start_system(f"sqlite:///{tmp_path / 'bd.sqlite'}", f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    files, truth = synthetic_jpegs(20, seed=12)
    check_completed_batch(system, files, truth)


def test_a_worker_holding_two_chunks_at_once_finishes_the_batch_as_one_at_a_time_does(start_system, pg_url, redis_url, tmp_path):
    """WORKER_CONCURRENCY=2 (what GPU workers run by default): one worker process, Celery's threads pool, two
    chunks in hand at once sharing one model. The batch ends as it does one chunk at a time, and the chunks'
    times overlap: the next chunk was claimed before the last one was written."""
    from datetime import datetime

    system = start_system(pg_url, redis_url, worker_env={"WORKER_CONCURRENCY": "2"})
    files, truth = synthetic_jpegs(32, seed=13)  # four chunks of 8
    job_id = check_completed_batch(system, files, truth)
    spans = sorted({(im["started_at"], im["finished_at"]) for im in system.client("a").images(job_id)})
    assert len(spans) == 4, spans  # a chunk's images are claimed together and written together
    spans = [(datetime.fromisoformat(a), datetime.fromisoformat(b)) for a, b in spans]
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), f"no two chunks overlapped: {spans}"
    log = (tmp_path / "worker0.log").read_text()
    assert "(pool thread," in log, "the worker ran Celery's threads pool"


def test_corrupt_file_fails_alone_with_its_reason(start_system, pg_url, redis_url):
    system = start_system(pg_url, redis_url)
    files, truth = synthetic_jpegs(20, seed=13)
    truncated = ("truncated.jpg", files[0][1][: len(files[0][1]) // 3])
    text = ("notes.jpg", b"this is a text file, not a radiograph\n")
    check_completed_batch(
        system,
        files[:10] + [truncated] + files[10:] + [text],
        truth,
        expect_failed={"truncated.jpg": "truncated", "notes.jpg": "not a PNG or JPEG"},
    )


def test_two_tenants_cannot_see_each_other(start_system, pg_url, redis_url):
    system = start_system(pg_url, redis_url, tenants=("a", "b"))
    a, b = system.client("a"), system.client("b")
    files, _ = synthetic_jpegs(3, seed=14)
    job_a = a.submit(files)["job_id"]
    job_b = b.submit(files[:1])["job_id"]
    a.wait(job_a, timeout=300)
    image_a = next(a.images(job_a))["image_id"]

    for path in (
        f"/v1/jobs/{job_a}",
        f"/v1/jobs/{job_a}/images",
        f"/v1/jobs/{job_a}/results.csv",
        f"/v1/images/{image_a}",
        f"/v1/images/{image_a}/mask.png",
        f"/v1/images/{image_a}/overlay.png",
    ):
        with pytest.raises(ApiError) as err:
            b.request("GET", path)
        assert err.value.status == 404, path
    with pytest.raises(ApiError) as err:
        b.request("DELETE", f"/v1/jobs/{job_a}")
    assert err.value.status == 404
    assert a.job(job_a)["status"] == "done", "b's cancel attempt changed nothing"
    assert [j["job_id"] for j in b.get_json("/v1/jobs")["jobs"]] == [job_b]
    assert [j["job_id"] for j in a.get_json("/v1/jobs")["jobs"]] == [job_a]


def test_one_job_sent_in_parts_is_processed_while_it_arrives(start_system, pg_url, redis_url):
    """A job opened for parts: its first part is segmented before the second is sent (the job says
    "receiving" meanwhile), and once closed it ends like a job sent whole: every image in the order
    sent, masks that match the drawn lesions. Then the client's submit_in_parts, two parts at once."""
    import time

    system = start_system(pg_url, redis_url)
    client = system.client("a")
    files, truth = synthetic_jpegs(20, seed=15)
    job_id = client.open_job(label="in parts")["job_id"]
    first = client.add_images(job_id, files[:8], external_ids=[f"acc-{i}" for i in range(8)])
    assert (first["first_position"], first["accepted"]) == (0, 8)
    deadline = time.monotonic() + 300
    while (job := client.job(job_id))["counts"]["done"] < 8:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "receiving" and job["finished_at"] is None, "all done so far, but the job is open"
    second = client.add_images(job_id, files[8:], external_ids=[f"acc-{i}" for i in range(8, 20)])
    assert (second["first_position"], second["accepted"]) == (8, 12)
    assert client.close_job(job_id)["total"] == 20
    final = client.wait(job_id, timeout=300)
    assert final["status"] == "done" and final["counts"]["done"] == 20
    images = list(client.images(job_id))
    assert [im["filename"] for im in images] == [name for name, _ in files]
    assert [im["external_id"] for im in images] == [f"acc-{i}" for i in range(20)]
    dices = [dice(np.array(Image.open(io.BytesIO(client.mask_png(im["image_id"])))), truth[im["filename"]]) for im in images]
    assert np.mean(dices) > 0.5, f"mean Dice against drawn lesions {np.mean(dices):.3f}"

    job = client.submit_in_parts(files, label="helper", part_size=6, uploaders=2, idempotency_key="night-15")
    final = client.wait(job["job_id"], timeout=300)  # parts of 6, 6, 6, 2
    assert final["status"] == "done" and final["total"] == 20
    assert sorted(im["filename"] for im in client.images(job["job_id"])) == sorted(name for name, _ in files)
    # the same call again (a script resumed after a failure): the same job, nothing added twice
    again = client.submit_in_parts(files, label="helper", part_size=6, uploaders=2, idempotency_key="night-15")
    assert again["job_id"] == job["job_id"]
    assert client.job(job["job_id"])["total"] == 20
