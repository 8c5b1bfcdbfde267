"""Nobody let in: tenant isolation on every /v1 route, API keys (hashed,
revocable), and no patient data stored or returned beyond what the client
sent. Through the real HTTP API, with a real worker."""

from __future__ import annotations

import hashlib
import io
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from bench.services import radiographs, start_system
from bonedetect.client import ApiError, Client
from bonedetect.local import settings_env

pytestmark = pytest.mark.integration

ID_ROUTES = re.compile(r"<(job_id|image_id)>")


@pytest.fixture
def system(tmp_path, pg_url, private_redis):
    system = start_system(tmp_path / "system", pg_url, private_redis.url, tenants=("a", "b"), workers=1)
    yield system
    system.stop()


def v1_routes(system) -> list[tuple[str, str]]:
    """(method, rule) of every /v1 route the running API serves."""
    app = system.api.server.app
    return sorted(
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/v1/")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    )


def test_another_tenants_ids_answer_404_on_every_v1_route(system):
    a, b = system.client("a"), system.client("b")
    job_a = a.submit(radiographs(2, seed=7), label="tenant a")["job_id"]
    job_b = b.submit(radiographs(1, seed=8), label="tenant b")["job_id"]
    a.wait(job_a, timeout=120, poll=0.25)
    b.wait(job_b, timeout=120, poll=0.25)
    image_a = next(a.images(job_a))["image_id"]
    ids = {"job_id": job_a, "image_id": image_a}

    checked = []
    for method, rule in v1_routes(system):
        names = ID_ROUTES.findall(rule)
        if not names:
            continue
        assert re.sub(ID_ROUTES, "", rule).count("<") == 0, f"{rule}: a parameter this test does not know"
        path = ID_ROUTES.sub(lambda m: ids[m.group(1)], rule)
        variants = [path, path + "?purge=true"] if method == "DELETE" else [path]
        for url in variants:
            with pytest.raises(ApiError) as err:
                b.request(method, url, b"" if method in ("POST", "PUT", "PATCH") else None)
            assert err.value.status == 404, f"{method} {url} as another tenant"
            assert b"not found" in err.value.body, "the same answer as for an id that does not exist"
            checked.append(f"{method} {rule}")
    assert {"GET /v1/jobs/<job_id>", "DELETE /v1/jobs/<job_id>", "GET /v1/jobs/<job_id>/images",
            "GET /v1/jobs/<job_id>/results.csv", "GET /v1/images/<image_id>", "GET /v1/images/<image_id>/mask.png",
            "GET /v1/images/<image_id>/overlay.png"} <= set(checked)  # fmt: skip

    # The routes without an id: listing shows only one's own jobs; submitting makes one's own.
    no_id = {f"{m} {r}" for m, r in v1_routes(system) if not ID_ROUTES.search(r)}
    assert no_id == {"GET /v1/jobs", "POST /v1/jobs"}, f"new /v1 routes to check for isolation: {no_id}"
    assert [j["job_id"] for j in b.get_json("/v1/jobs")["jobs"]] == [job_b]
    assert [j["job_id"] for j in a.get_json("/v1/jobs")["jobs"]] == [job_a]

    # b's cancel and purge attempts changed nothing of a's.
    job = a.job(job_a)
    assert job["status"] == "done" and job["cancelled_at"] is None and job["counts"]["done"] == 2
    assert a.mask_png(image_a).startswith(b"\x89PNG")
    assert a.request("GET", f"/v1/images/{image_a}/source")


def test_api_keys_are_stored_hashed_and_a_revoked_key_is_refused(tmp_path, pg_url, private_redis):
    system = start_system(tmp_path / "keys", pg_url, private_redis.url, workers=0)
    try:
        check_keys(system)
    finally:
        system.stop()


def check_keys(system) -> None:
    from db.models import ApiKey, Tenant

    env = settings_env(system.settings)
    made = subprocess.run([sys.executable, "-m", "bonedetect.cli", "create-tenant", "St Revoked"], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    key = re.search(r"API key \(shown once[^)]*\): (\S+)", made.stdout).group(1)
    client = Client(system.api_url, key)
    assert client.get_json("/v1/jobs") == {"jobs": [], "next_cursor": None}

    with system.sessions() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == "St Revoked"))
        (row,) = session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant.id)).all()
        stored = [str(getattr(row, c.key)) for c in ApiKey.__table__.columns]
        stored += [str(getattr(tenant, c.key)) for c in Tenant.__table__.columns]
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert not any(key in value for value in stored), "the key itself is stored nowhere"
    assert row.prefix == key[:10], "only a short prefix, to tell keys apart"

    # Rotation: issue a second key, switch to it, revoke the first.
    issued = subprocess.run([sys.executable, "-m", "bonedetect.cli", "issue-key", "St Revoked"], env=env,
                            capture_output=True, text=True, check=True)  # fmt: skip
    new_key = re.search(r"API key \(shown once[^)]*\): (\S+)", issued.stdout).group(1)
    assert new_key != key
    revoked = subprocess.run([sys.executable, "-m", "bonedetect.cli", "revoke-key", key[:10]], env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert revoked.returncode == 0 and "revoked 1 key" in revoked.stdout
    with pytest.raises(ApiError) as err:
        client.get_json("/v1/jobs")
    assert err.value.status == 401 and b"invalid or revoked API key" in err.value.body
    assert Client(system.api_url, new_key).get_json("/v1/jobs")["jobs"] == [], "the rotated-in key works"
    assert system.client("a").get_json("/v1/jobs")["jobs"] == [], "other tenants' keys still work"


# -- no patient data -----------------------------------------------------------------

SECRETS = ("Jane", "Roe", "MRN-0042", "19700101", "1970-01-01", "Elsewhere", "ACC-77", "House")


def jpeg_with_exif() -> bytes:
    ((_, data),) = radiographs(1, seed=21)
    exif = Image.Exif()
    exif[0x010E] = "Patient: Jane Roe, DOB 1970-01-01, MRN-0042"  # ImageDescription
    exif[0x013B] = "Dr Gregory House, St Elsewhere"  # Artist
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, format="JPEG", quality=92, exif=exif.tobytes())
    return out.getvalue()


def dicom_with_identity() -> bytes:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from training.synthetic import synthetic_radiograph

    image, _, _ = synthetic_radiograph(np.random.default_rng(22), 256, 320)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CR"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Roe^Jane", "MRN-0042", "19700101"
    ds.InstitutionName, ds.AccessionNumber, ds.ReferringPhysicianName = "St Elsewhere", "ACC-77", "House^Gregory"
    ds.StudyDate = ds.ContentDate = "19700101"
    ds.set_pixel_data((image.astype(np.uint16) * 16), "MONOCHROME2", 12, generate_instance_uid=False)
    ds.ImagerPixelSpacing = [0.15, 0.15]
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def searchable(data: bytes) -> bytes:
    """What text could hide in: a PNG's metadata chunks, not its compressed
    pixels (where any three letters turn up by chance); other bodies whole."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data.lower()
    out, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind != b"IDAT":
            out.append(data[pos + 4 : pos + 8 + length])
        pos += 12 + length
    return b"".join(out).lower()


def test_no_patient_data_beyond_what_the_client_sent_is_stored_or_returned(system):
    from db.models import Image as ImageRow
    from db.models import Job

    client = system.client("a")
    files = [("knee.jpg", jpeg_with_exif()), ("hip.dcm", dicom_with_identity())]
    job_id = client.submit(files, label="night 3", external_ids=["acc-1", "acc-2"])["job_id"]
    final = client.wait(job_id, timeout=120, poll=0.25)
    assert final["counts"]["done"] == 2, final

    returned = [client.request("GET", f"/v1/jobs/{job_id}"), client.request("GET", "/v1/jobs"),
                client.request("GET", f"/v1/jobs/{job_id}/images"), client.results_csv(job_id).encode()]  # fmt: skip
    images = list(client.images(job_id))
    assert [(im["filename"], im["external_id"]) for im in images] == [("knee.jpg", "acc-1"), ("hip.dcm", "acc-2")]
    for im in images:
        returned += [client.request("GET", f"/v1/images/{im['image_id']}"), client.mask_png(im["image_id"]),
                     client.overlay_png(im["image_id"])]  # fmt: skip
        if im.get("seg_url"):
            returned.append(client.request("GET", im["seg_url"]))
    assert any(im.get("seg_url") for im in images), "the DICOM got its SEG, checked here too"
    for body in returned:
        for secret in SECRETS:
            assert secret.lower().encode() not in searchable(body), f"{secret!r} returned by the API"

    with system.sessions() as session:
        rows = [
            *session.scalars(select(Job).where(Job.id == job_id)),
            *session.scalars(select(ImageRow).where(ImageRow.job_id == job_id)),
        ]
        stored = " ".join(str(getattr(r, c.key)) for r in rows for c in type(r).__table__.columns)
    for secret in SECRETS:
        assert secret.lower() not in stored.lower(), f"{secret!r} stored in the database"

    results = [p for p in system.blob_root.rglob("*") if p.is_file() and p.name != "source"]
    assert {p.name for p in results} >= {"mask.png", "overlay.png", "seg.dcm"}
    logs = system.worker_logs().encode()
    for data in [p.read_bytes() for p in results] + [logs]:
        for secret in SECRETS:
            assert secret.lower().encode() not in searchable(data), f"{secret!r} in a stored result file or log"
