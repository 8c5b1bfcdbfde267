"""What the API adds for hospitals: the callback URL of a submission (checked,
then shown with its delivery record), the tenant's webhook secret, box size in
millimetres, and the DICOM SEG route's answers before and without a SEG."""

from __future__ import annotations

import csv
import io

import pytest
from sqlalchemy import select, update

from db.models import CallbackDelivery, Job, Tenant
from db.tenants import rotate_webhook_secret
from tests.api.conftest import jpeg_bytes

DICOM_HEAD = b"\0" * 128 + b"DICM"


@pytest.mark.parametrize(
    "url, reason",
    [
        ("ftp://example.org/x", "must be an http:// or https:// URL"),
        ("javascript:alert(1)", "must be an http:// or https:// URL"),
        ("https:///path-only", "has no host"),
        ("https://user:pw@example.org/hook", "must not carry credentials"),
        ("https://example.org:99999/hook", "not a valid URL"),
        ("https://example.org/a b", "must not contain spaces"),
        ("https://example.org/" + "x" * 2000, "longer than 2000"),
    ],
)
def test_bad_callback_url_is_refused_and_nothing_is_stored(api, url, reason):
    res = api.submit([("a.jpg", jpeg_bytes())], fields=[("callback_url", url)])
    assert res.status_code == 400 and reason in res.json["error"], res.json
    assert api.get("/v1/jobs").json["jobs"] == []


def test_job_shows_its_callback_and_each_recorded_attempt(api):
    plain = api.submit([("a.jpg", jpeg_bytes())]).json["job_id"]
    assert api.get(f"/v1/jobs/{plain}").json["callback"] is None

    url = "https://ris.example-hospital.org/bonedetect/hook?site=3"
    job_id = api.submit([("a.jpg", jpeg_bytes())], fields=[("callback_url", url)]).json["job_id"]
    assert api.get(f"/v1/jobs/{job_id}").json["callback"] == {"url": url, "state": "waiting", "attempts": []}

    with api.sessions.begin() as session:  # play the worker's delivery task
        session.add(CallbackDelivery(job_id=job_id, attempt=1, status="failed", http_status=503, error="HTTP 503 Service Unavailable"))
        session.add(CallbackDelivery(job_id=job_id, attempt=2, status="delivered", http_status=204))
    api.set_images([r.id for r in api.rows(job_id)], status="done")
    with api.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(callback_state="delivered"))
    callback = api.get(f"/v1/jobs/{job_id}").json["callback"]
    assert callback["state"] == "delivered"
    assert [(a["attempt"], a["status"], a["http_status"], a["error"]) for a in callback["attempts"]] == [
        (1, "failed", 503, "HTTP 503 Service Unavailable"),
        (2, "delivered", 204, None),
    ]
    assert all(a["at"].endswith("Z") for a in callback["attempts"])
    assert api.get(f"/v1/jobs/{job_id}", tenant="b").status_code == 404


def test_every_tenant_gets_a_webhook_secret_and_can_rotate_it(api):
    with api.sessions.begin() as session:
        secrets = {t.name: t.webhook_secret for t in session.scalars(select(Tenant))}
    assert all(s and s.startswith("whsec_") and len(s) > 40 for s in secrets.values())
    assert len(set(secrets.values())) == len(secrets)
    with api.sessions.begin() as session:
        new = rotate_webhook_secret(session, "hospital-a")
    with api.sessions() as session:
        assert session.scalar(select(Tenant.webhook_secret).where(Tenant.name == "hospital-a")) == new != secrets["hospital-a"]
    with api.sessions.begin() as session, pytest.raises(ValueError, match="no tenant named"):
        rotate_webhook_secret(session, "nobody")


def test_box_size_in_mm_from_the_row_and_column_spacing(api):
    job_id = api.submit([("a.jpg", jpeg_bytes()), ("b.jpg", jpeg_bytes())]).json["job_id"]
    rows = api.rows(job_id)
    api.set_images([rows[0].id], status="done", bbox_w=50, bbox_h=20, pixel_spacing_mm=0.2, spacing_col_mm=0.1,
                   spacing_source="PixelSpacing", area_px=700, area_mm2=14.0, source_format="JPEG")  # fmt: skip
    api.set_images([rows[1].id], status="done", bbox_w=50, bbox_h=20, source_format="JPEG")
    images = api.get(f"/v1/jobs/{job_id}/images").json["images"]
    assert (images[0]["bbox_w_mm"], images[0]["bbox_h_mm"]) == (5.0, 4.0)  # 50 columns x 0.1 mm, 20 rows x 0.2 mm
    assert (images[1]["bbox_w_mm"], images[1]["bbox_h_mm"]) == (None, None), "no spacing, no millimetres"
    assert images[0]["source_format"] == "JPEG"
    table = list(csv.DictReader(io.StringIO(api.get(f"/v1/jobs/{job_id}/results.csv").get_data(as_text=True))))
    assert (table[0]["bbox_w_mm"], table[0]["bbox_h_mm"], table[1]["bbox_w_mm"]) == ("5.0", "4.0", "")


def test_seg_route_answers_before_and_without_a_seg(api):
    job_id = api.submit([("a.jpg", jpeg_bytes()), ("b.dcm", DICOM_HEAD + b"\0" * 64)]).json["job_id"]
    jpeg, dicom = api.rows(job_id)
    assert dicom.content_type == "application/dicom"

    res = api.get(f"/v1/images/{jpeg.id}/seg.dcm")
    assert res.status_code == 404 and "not uploaded as DICOM" in res.json["error"]
    res = api.get(f"/v1/images/{dicom.id}/seg.dcm")
    assert res.status_code == 409 and res.json["error"] == "image is queued: no SEG"
    assert api.get(f"/v1/images/{dicom.id}/seg.dcm", tenant="b").status_code == 404

    api.set_images([dicom.id], status="done", source_format="DICOM")  # done, but the worker wrote no SEG
    res = api.get(f"/v1/images/{dicom.id}/seg.dcm")
    assert res.status_code == 404 and "no DICOM SEG was made" in res.json["error"]
    assert api.get(f"/v1/images/{dicom.id}").json["seg_url"] == f"/v1/images/{dicom.id}/seg.dcm"

    api.blobs.put_bytes(dicom.blob_key.rsplit("/", 1)[0] + "/seg.dcm", DICOM_HEAD + b"seg")
    res = api.get(f"/v1/images/{dicom.id}/seg.dcm")
    assert res.status_code == 200 and res.mimetype == "application/dicom" and res.data == DICOM_HEAD + b"seg"
