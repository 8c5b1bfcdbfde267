"""Polling, pages, CSV, masks, cancel, and what one tenant can see of another."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta, timezone

from db.blobstore import image_prefix
from db.models import STAT_COLUMNS
from tests.api.conftest import png_bytes

STATS = dict(
    tumor_detected=True, area_px=120, area_fraction=0.1, area_mm2=None, bbox_x=3, bbox_y=4, bbox_w=10, bbox_h=12,
    centroid_x=8.5, centroid_y=9.5, n_regions=1, prob_max=0.97, prob_mean=0.81,
)  # fmt: skip


def submit(api, n: int, tenant: str = "a") -> tuple[str, list]:
    resp = api.submit([(f"img-{i}.png", png_bytes(seed=i)) for i in range(n)], tenant=tenant)
    assert resp.status_code == 202, resp.json
    job_id = resp.json["job_id"]
    return job_id, api.rows(job_id)


def finish(api, row, status: str = "done", with_blobs: bool = True, **extra) -> None:
    """Do what the worker does for one image."""
    now = datetime.now(timezone.utc)
    values = dict(status=status, started_at=now - timedelta(seconds=1), finished_at=now, **extra)
    if status == "done":
        prefix = image_prefix(row.tenant_id, row.job_id, row.id)
        if with_blobs:
            api.blobs.put_bytes(f"{prefix}/mask.png", png_bytes(seed=99))
            api.blobs.put_bytes(f"{prefix}/overlay.png", png_bytes(seed=98))
        values.update(
            STATS, mask_key=f"{prefix}/mask.png", overlay_key=f"{prefix}/overlay.png", width=40, height=30,
            model_version="unet-test-1", processing_ms=12.5,
        )  # fmt: skip
    api.set_images([row.id], **values)


def is_utc_iso(value: str) -> bool:
    return value.endswith("Z") and datetime.fromisoformat(value).utcoffset() == timedelta(0)


def test_poll_follows_the_image_rows(any_db_api):
    api = any_db_api
    job_id, rows = submit(api, 4)
    assert api.broker.uncommitted == []

    job = api.get(f"/v1/jobs/{job_id}").json
    assert job["status"] == "queued" and job["total"] == 4 and job["progress"] == 0.0
    assert job["counts"] == {"queued": 4, "processing": 0, "done": 0, "failed": 0, "cancelled": 0}
    assert job["started_at"] is None and job["finished_at"] is None and job["cancelled_at"] is None
    assert is_utc_iso(job["created_at"])
    assert job["links"] == {
        "self": f"/v1/jobs/{job_id}",
        "images": f"/v1/jobs/{job_id}/images",
        "results_csv": f"/v1/jobs/{job_id}/results.csv",
    }

    api.set_images([rows[0].id, rows[1].id], status="processing", started_at=datetime.now(timezone.utc))
    job = api.get(f"/v1/jobs/{job_id}").json
    assert job["status"] == "processing" and job["counts"]["processing"] == 2 and is_utc_iso(job["started_at"])

    finish(api, rows[0])
    finish(api, rows[1], status="failed", error="not a decodable image: truncated file")
    finish(api, rows[2])
    job = api.get(f"/v1/jobs/{job_id}").json
    assert job["status"] == "processing"
    assert job["progress"] == 0.75 and job["finished_at"] is None

    finish(api, rows[3])
    job = api.get(f"/v1/jobs/{job_id}").json
    assert job["status"] == "done_with_errors" and job["progress"] == 1.0
    assert job["counts"] == {"queued": 0, "processing": 0, "done": 3, "failed": 1, "cancelled": 0}
    assert job["model_versions"] == ["unet-test-1"] and is_utc_iso(job["finished_at"])

    done = api.get(f"/v1/jobs/{job_id}/images").json["images"][0]
    assert {k: done[k] for k in STATS} == STATS
    assert done["mask_url"] == f"/v1/images/{rows[0].id}/mask.png"
    assert done["overlay_url"] == f"/v1/images/{rows[0].id}/overlay.png"
    assert done["processing_ms"] == 12.5 and (done["width"], done["height"]) == (40, 30)


def test_image_json_has_every_field(api):
    job_id, rows = submit(api, 1)
    image = api.get(f"/v1/images/{rows[0].id}").json
    assert list(image) == [
        "image_id", "job_id", "position", "filename", "external_id", "status", "error", "content_type",
        "source_format", "size_bytes", "width", "height", *STAT_COLUMNS, "pixel_spacing_mm", "spacing_col_mm",
        "spacing_source", "model_version", "processing_ms", "attempts", "bbox_w_mm", "bbox_h_mm", "created_at",
        "started_at", "finished_at", "mask_url", "overlay_url", "seg_url",
    ]  # fmt: skip
    assert image["image_id"] == rows[0].id and image["job_id"] == job_id and image["status"] == "queued"
    assert image["mask_url"] is None and is_utc_iso(image["created_at"])


def test_pages_walk_every_image_exactly_once(api):
    job_id, rows = submit(api, 7)
    seen, cursor, pages = [], None, 0
    while True:
        page = api.get(f"/v1/jobs/{job_id}/images", query_string={"limit": 3, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200
        seen += [im["image_id"] for im in page.json["images"]]
        pages += 1
        cursor = page.json["next_cursor"]
        if cursor is None:
            break
    assert seen == [r.id for r in rows] and pages == 3

    whole = api.get(f"/v1/jobs/{job_id}/images?limit=5000").json
    assert len(whole["images"]) == 7 and whole["next_cursor"] is None, "limit is capped, not refused"
    exact = api.get(f"/v1/jobs/{job_id}/images?limit=7").json
    assert len(exact["images"]) == 7 and exact["next_cursor"] is None

    for bad in ("limit=0", "limit=-1", "limit=ten", "cursor=garbage!", "cursor=WyJ4Il0", "status=weird"):
        resp = api.get(f"/v1/jobs/{job_id}/images?{bad}")
        assert resp.status_code == 400 and resp.is_json, bad


def test_images_filter_by_status(api):
    job_id, rows = submit(api, 4)
    finish(api, rows[1], status="failed", error="boom")
    finish(api, rows[3], status="failed", error="boom")
    failed = api.get(f"/v1/jobs/{job_id}/images?status=failed&limit=1").json
    assert [im["position"] for im in failed["images"]] == [1]
    rest = api.get(f"/v1/jobs/{job_id}/images?status=failed&cursor={failed['next_cursor']}").json
    assert [im["position"] for im in rest["images"]] == [3] and rest["next_cursor"] is None


def test_results_csv_has_a_header_and_one_row_per_image(api, monkeypatch):
    from api import jobs as api_jobs

    monkeypatch.setattr(api_jobs, "CSV_PAGE", 2)  # several pages through the stream
    files = [("a.png", png_bytes()), ("=cmd|calc.png", png_bytes()), ("notes.jpg", b"text"), ("d.png", png_bytes())]
    job_id = api.submit(files, fields=[("external_id", f"acc-{i}") for i in range(4)]).json["job_id"]
    rows = api.rows(job_id)
    finish(api, rows[0])

    resp = api.get(f"/v1/jobs/{job_id}/results.csv")
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    assert resp.headers["Content-Disposition"] == f'attachment; filename="bonedetect-{job_id}.csv"'
    table = list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))
    assert [r["image_id"] for r in table] == [r.id for r in rows]
    assert [r["status"] for r in table] == ["done", "queued", "failed", "queued"]
    assert [r["external_id"] for r in table] == ["acc-0", "acc-1", "acc-2", "acc-3"]
    assert table[0]["area_px"] == "120" and table[0]["tumor_detected"] == "true" and table[0]["area_mm2"] == ""
    assert table[1]["filename"] == "'=cmd|calc.png", "no formula runs when a spreadsheet opens it"
    assert table[2]["error"] == "unsupported file type: not a PNG or JPEG image, nor a DICOM file"


def test_mask_is_409_until_done_then_png(api):
    _, rows = submit(api, 1)
    image_id = rows[0].id
    for kind in ("mask", "overlay"):
        resp = api.get(f"/v1/images/{image_id}/{kind}.png")
        assert resp.status_code == 409 and resp.json == {"error": f"image is queued: no {kind}"}
    finish(api, rows[0])
    for kind, seed in (("mask", 99), ("overlay", 98)):
        resp = api.get(f"/v1/images/{image_id}/{kind}.png")
        assert resp.status_code == 200 and resp.mimetype == "image/png"
        assert resp.data == png_bytes(seed=seed)


def test_overlay_is_rendered_on_first_request_then_kept(api):
    """OVERLAYS=lazy: the worker stored the mask only; the API makes the overlay
    from the upload and the mask, exactly as an eager worker would, and keeps it."""
    import numpy as np
    from PIL import Image as PILImage

    from worker.overlay import render_overlay_png

    rows = lazy_done(api, 2)
    mask_png = api.blobs.get_bytes(f"{image_prefix(rows[0].tenant_id, rows[0].job_id, rows[0].id)}/mask.png")
    overlay_key = f"{image_prefix(rows[0].tenant_id, rows[0].job_id, rows[0].id)}/overlay.png"
    assert not api.blobs.exists(overlay_key)
    resp = api.get(f"/v1/images/{rows[0].id}/overlay.png")
    assert resp.status_code == 200 and resp.mimetype == "image/png"
    assert resp.data == render_overlay_png(png_bytes(seed=0), mask_png)
    rgb = np.array(PILImage.open(io.BytesIO(resp.data)))
    assert rgb.shape == (30, 40, 3) and tuple(rgb[5, 10]) == (255, 0, 0) and (rgb[25, 35] == rgb[25, 35, 0]).all()
    assert api.blobs.get_bytes(overlay_key) == resp.data, "kept for the next request"
    assert api.get(f"/v1/images/{rows[0].id}/overlay.png").data == resp.data

    api.blobs.delete_prefix(rows[1].blob_key)  # the upload is gone: say so, do not make something up
    resp = api.get(f"/v1/images/{rows[1].id}/overlay.png")
    assert resp.status_code == 404 and "upload or mask is missing" in resp.json["error"]


def lazy_done(api, n: int = 1):
    """n done images with a mask and no overlay yet (what an OVERLAYS=lazy worker leaves)."""
    import numpy as np
    from PIL import Image as PILImage

    _, rows = submit(api, n)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:15, 5:20] = 255
    buf = io.BytesIO()
    PILImage.fromarray(mask).save(buf, "PNG")
    for row in rows:
        finish(api, row, with_blobs=False)
        api.blobs.put_bytes(f"{image_prefix(row.tenant_id, row.job_id, row.id)}/mask.png", buf.getvalue())
    return rows


def test_overlay_renders_are_bounded_and_failures_are_clear(api, monkeypatch):
    from api import images

    rows = lazy_done(api, 3)
    monkeypatch.setattr(images, "RENDER_WAIT_S", 0.05)
    held = [images._renders.acquire(timeout=1) for _ in range(images.RENDERS_AT_ONCE)]  # others are rendering
    try:
        resp = api.get(f"/v1/images/{rows[0].id}/overlay.png")
        assert resp.status_code == 503 and resp.headers["Retry-After"] and "busy rendering" in resp.json["error"]
    finally:
        for ok in held:
            ok and images._renders.release()
    assert api.get(f"/v1/images/{rows[0].id}/overlay.png").status_code == 200, "served once a slot is free"

    api.blobs.put_bytes(rows[1].blob_key, b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # the stored upload went bad
    resp = api.get(f"/v1/images/{rows[1].id}/overlay.png")
    assert resp.status_code == 500 and "could not be rendered" in resp.json["error"]

    def full_disk(key, data):
        raise OSError("No space left on device")

    monkeypatch.setattr(api.blobs, "put_bytes", full_disk)
    resp = api.get(f"/v1/images/{rows[2].id}/overlay.png")
    assert resp.status_code == 200 and resp.data.startswith(b"\x89PNG"), "served even when it cannot be kept"


def test_overlay_rendered_while_its_job_is_purged_leaves_nothing_behind(api, monkeypatch):
    import worker.overlay
    from db.models import Image as ImageRow

    (row,) = lazy_done(api, 1)
    real = worker.overlay.render_overlay_png

    def render_while_purged(*args, **kw):
        with api.sessions.begin() as session:  # DELETE ...?purge=true lands meanwhile: rows first, then blobs
            session.query(ImageRow).filter(ImageRow.id == row.id).delete()
        api.blobs.delete_prefix(image_prefix(row.tenant_id, row.job_id, row.id))
        return real(*args, **kw)

    monkeypatch.setattr(worker.overlay, "render_overlay_png", render_while_purged)
    assert api.get(f"/v1/images/{row.id}/overlay.png").status_code == 200
    assert not api.blobs.exists(f"{image_prefix(row.tenant_id, row.job_id, row.id)}/overlay.png")


def test_failed_image_has_no_mask_and_a_missing_blob_is_404(api):
    _, rows = submit(api, 2)
    finish(api, rows[0], status="failed", error="not a decodable image")
    resp = api.get(f"/v1/images/{rows[0].id}/mask.png")
    assert resp.status_code == 409 and resp.json == {"error": "image is failed: no mask"}
    finish(api, rows[1], with_blobs=False)
    resp = api.get(f"/v1/images/{rows[1].id}/mask.png")
    assert resp.status_code == 404 and "missing from the blob store" in resp.json["error"]


def test_cancel_stops_queued_images_and_is_idempotent(any_db_api):
    api = any_db_api
    job_id, rows = submit(api, 4)
    finish(api, rows[0])
    api.set_images([rows[1].id], status="processing", started_at=datetime.now(timezone.utc))

    resp = api.client.delete(f"/v1/jobs/{job_id}", headers=api.auth())
    assert resp.status_code == 202
    job = resp.json
    assert job["counts"] == {"queued": 0, "processing": 1, "done": 1, "failed": 0, "cancelled": 2}
    assert job["status"] == "processing", "the image in flight finishes"
    assert is_utc_iso(job["cancelled_at"])
    assert [r.status for r in api.rows(job_id)] == ["done", "processing", "cancelled", "cancelled"]
    assert all(r.finished_at is not None for r in api.rows(job_id)[2:])

    finish(api, api.rows(job_id)[1])
    again = api.client.delete(f"/v1/jobs/{job_id}", headers=api.auth())
    assert again.status_code == 202 and again.json["cancelled_at"] == job["cancelled_at"]
    assert again.json["status"] == "cancelled" and again.json["progress"] == 1.0


def test_cancelling_a_finished_job_changes_nothing(api):
    job_id, rows = submit(api, 1)
    finish(api, rows[0])
    resp = api.client.delete(f"/v1/jobs/{job_id}", headers=api.auth())
    assert resp.status_code == 202 and resp.json["status"] == "done" and resp.json["cancelled_at"] is None


def test_job_list_is_newest_first_and_paginated(api):
    ids = [submit(api, 1)[0] for _ in range(5)]
    submit(api, 1, tenant="b")
    seen, cursor = [], None
    while True:
        page = api.get("/v1/jobs", query_string={"limit": 2, **({"cursor": cursor} if cursor else {})}).json
        seen += [j["job_id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    assert api.get("/v1/jobs?cursor=bm9wZQ").status_code == 400


def test_tenants_cannot_see_each_others_jobs_and_images(any_db_api):
    api = any_db_api
    job_a, rows_a = submit(api, 2, tenant="a")
    job_b, _ = submit(api, 1, tenant="b")
    finish(api, rows_a[0])
    image_a = rows_a[0].id

    for path in (
        f"/v1/jobs/{job_a}",
        f"/v1/jobs/{job_a}/images",
        f"/v1/jobs/{job_a}/results.csv",
        f"/v1/images/{image_a}",
        f"/v1/images/{image_a}/mask.png",
        f"/v1/images/{image_a}/overlay.png",
    ):
        assert api.get(path, tenant="a").status_code == 200, path
        resp = api.get(path, tenant="b")
        assert resp.status_code == 404 and resp.json["error"].endswith("not found"), path
    resp = api.client.delete(f"/v1/jobs/{job_a}", headers=api.auth("b"))
    assert resp.status_code == 404
    assert [r.status for r in api.rows(job_a)] == ["done", "queued"], "b's cancel changed nothing"
    assert api.job_row(job_a).cancelled_at is None
    assert [j["job_id"] for j in api.get("/v1/jobs", tenant="b").json["jobs"]] == [job_b]
    assert [j["job_id"] for j in api.get("/v1/jobs", tenant="a").json["jobs"]] == [job_a]


def test_malformed_and_unknown_ids_are_404(any_db_api):
    api = any_db_api
    for bad in ("not-a-uuid", "1", "00000000-0000-0000-0000-00000000000g", "%00", "x" * 300):
        for path in (f"/v1/jobs/{bad}", f"/v1/jobs/{bad}/images", f"/v1/images/{bad}", f"/v1/images/{bad}/mask.png"):
            resp = api.get(path)
            assert resp.status_code == 404 and resp.is_json, path
    unknown = "6f1c1f5e-0000-4000-8000-000000000000"
    assert api.get(f"/v1/jobs/{unknown}").json == {"error": "job not found"}
    assert api.get(f"/v1/images/{unknown}").json == {"error": "image not found"}
