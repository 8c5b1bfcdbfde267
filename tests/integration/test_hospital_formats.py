"""Hospital formats through the real system (HTTP API, broker, Celery worker
process, SQL, blob store): a zipped DICOM study in, millimetres and a DICOM SEG
per image out; and the job-completion callback to a real HTTP receiver on
loopback, signed with the tenant's secret and retried with backoff."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from bonedetect.client import ApiError
from tests.integration.conftest import synthetic_jpegs

pytestmark = pytest.mark.integration

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
IDENTITY = {"PatientName": "Doe^Jane", "PatientID": "PID-0042", "PatientBirthDate": "19700101", "StudyDate": "20240102"}


def cr_file(seed: int, h: int, w: int, **spacing) -> tuple[bytes, Dataset]:
    """A 12-bit MONOCHROME1 CR of a synthetic radiograph with a drawn lesion, written with pydicom."""
    from training.synthetic import synthetic_radiograph

    image, _, _ = synthetic_radiograph(np.random.default_rng(seed), h, w)
    stored = (4095 - image.astype(np.uint16) * 16).astype(np.uint16)  # MONOCHROME1: bone is low
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CR"
    for key, value in IDENTITY.items():
        setattr(ds, key, value)
    ds.set_pixel_data(stored, "MONOCHROME1", 12, generate_instance_uid=False)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    for key, value in spacing.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), ds


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zipped_dicom_study_gives_millimetres_and_a_seg_per_image(start_system, pg_url, redis_url):
    system = start_system(pg_url, redis_url)
    client = system.client("a")
    detector, ds_detector = cr_file(21, 320, 400, ImagerPixelSpacing=[0.15, 0.15])
    calibrated, ds_calibrated = cr_file(22, 360, 300, PixelSpacing=[0.2, 0.1])  # rows 0.2 mm apart, columns 0.1 mm
    dicomdir = get_testdata_file("dicomdirtests/DICOMDIR", download=False)
    study = zip_of(
        {
            **({"DICOMDIR": open(dicomdir, "rb").read()} if dicomdir else {}),
            "1/CR1/IM0": detector,
            "1/CR2/IM0": calibrated,
        }
    )
    [(jpeg_name, jpeg)], _ = synthetic_jpegs(1, seed=23)
    job = client.submit([("study.zip", study), (jpeg_name, jpeg)], label="dicom study")
    assert job["image_count"] == 3 and job["rejected"] == []
    final = client.wait(job["job_id"], timeout=300)
    assert final["status"] == "done", final

    images = {im["filename"]: im for im in client.images(job["job_id"])}
    assert set(images) == {"study.zip/1/CR1/IM0", "study.zip/1/CR2/IM0", jpeg_name}
    found = 0
    for name, ds, (row_mm, col_mm), source in [
        ("study.zip/1/CR1/IM0", ds_detector, (0.15, 0.15), "ImagerPixelSpacing (detector plane)"),
        ("study.zip/1/CR2/IM0", ds_calibrated, (0.2, 0.1), "PixelSpacing"),
    ]:
        im = images[name]
        assert im["status"] == "done" and im["source_format"] == "DICOM" and im["content_type"] == "application/dicom"
        assert (im["width"], im["height"]) == (ds.Columns, ds.Rows)
        assert (im["pixel_spacing_mm"], im["spacing_col_mm"], im["spacing_source"]) == (row_mm, col_mm, source)
        assert im["area_mm2"] == pytest.approx(im["area_px"] * row_mm * col_mm)
        if im["tumor_detected"]:
            found += 1
            assert im["bbox_w_mm"] == pytest.approx(im["bbox_w"] * col_mm, abs=1e-3)
            assert im["bbox_h_mm"] == pytest.approx(im["bbox_h"] * row_mm, abs=1e-3)

        mask = np.array(Image.open(io.BytesIO(client.mask_png(im["image_id"])))) > 0
        assert im["seg_url"] == f"/v1/images/{im['image_id']}/seg.dcm"
        seg = hd.seg.segread(io.BytesIO(client.seg_dcm(im["image_id"])))
        assert seg.StudyInstanceUID == ds.StudyInstanceUID
        ref = seg.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == ds.SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        frame = seg.get_pixels_by_source_instance(source_sop_instance_uids=[ds.SOPInstanceUID], combine_segments=True)[0]
        assert frame.shape == mask.shape and np.array_equal(frame > 0, mask), "the SEG's frame is the mask, pixel for pixel"
        assert (seg.PatientName, seg.PatientID, seg.PatientBirthDate, seg.StudyDate) == ("", "", "", "")
    assert found >= 1, "the demo model finds the drawn lesion in at least one radiograph"

    im = images[jpeg_name]
    assert im["source_format"] == "JPEG" and im["seg_url"] is None and im["bbox_w_mm"] is None
    with pytest.raises(ApiError) as err:
        client.seg_dcm(im["image_id"])
    assert err.value.status == 404 and "not uploaded as DICOM" in str(err.value)


# -- callbacks -------------------------------------------------------------------


class Receiver:
    """A real HTTP server on loopback that answers each POST with the next scripted status."""

    def __init__(self, answers: list[int]):
        self.answers, self.calls, self.lock = list(answers), [], threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.calls.append((self.headers, body, time.monotonic()))  # names case-insensitive
                    status = receiver.answers.pop(0) if len(receiver.answers) > 1 else receiver.answers[0]
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if status >= 300 else b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/bonedetect/hook"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []

    def make(answers):
        made.append(Receiver(answers))
        return made[-1]

    yield make
    for r in made:
        r.close()


def wait_for_callback(client, job_id: str, state: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        callback = client.job(job_id)["callback"]
        if callback["state"] == state:
            return callback
        assert time.monotonic() < deadline, f"callback still {callback}"
        time.sleep(0.2)


def verify(secret: str, headers, body: bytes) -> bool:
    """What a receiver does (docs/callbacks.md), written here from the docs, not imported."""
    timestamp = headers["X-BoneDetect-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers["X-BoneDetect-Signature"])


def tenant_secret(system, name: str) -> str:
    from db.models import Tenant
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(system.settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            return session.scalar(select(Tenant.webhook_secret).where(Tenant.name == f"hospital-{name}"))
    finally:
        engine.dispose()


@pytest.fixture(params=["postgresql+redis", "embedded"])
def system_urls(request, tmp_path) -> tuple[str, str]:
    if request.param == "embedded":
        return f"sqlite:///{tmp_path / 'bd.sqlite'}", f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    return request.getfixturevalue("pg_url"), request.getfixturevalue("redis_url")


def test_callback_is_signed_and_retried_until_delivered(start_system, system_urls, monkeypatch, receivers):
    monkeypatch.setenv("CALLBACK_BACKOFF_S", "1")  # seconds, doubling: 0-1 s, then 0-2 s (full jitter)
    monkeypatch.setenv("CALLBACK_BACKOFF_MAX_S", "2")
    monkeypatch.setenv("CALLBACK_MAX_RETRIES", "2")
    system = start_system(*system_urls)
    client = system.client("a")
    receiver = receivers([500, 500, 204])  # fails twice, then takes it

    files, _ = synthetic_jpegs(2, seed=31)
    job = client.submit(files, label="night batch", callback_url=receiver.url)
    assert client.job(job["job_id"])["callback"] == {"url": receiver.url, "state": "waiting", "attempts": []}
    final = client.wait(job["job_id"], timeout=300)
    callback = wait_for_callback(client, job["job_id"], "delivered")

    assert [(a["attempt"], a["status"], a["http_status"]) for a in callback["attempts"]] == [
        (1, "failed", 500), (2, "failed", 500), (3, "delivered", 204),
    ]  # fmt: skip
    assert callback["attempts"][0]["error"].startswith("HTTP 500")
    assert len(receiver.calls) == 3
    secret = tenant_secret(system, "a")
    for i, (headers, body, _) in enumerate(receiver.calls, start=1):
        assert verify(secret, headers, body), "the signature verifies with the tenant's webhook secret"
        assert not verify(secret + "x", headers, body)
        assert headers["X-BoneDetect-Delivery"] == f"{job['job_id']}/{i}" and headers["Content-Type"] == "application/json"
        assert abs(int(headers["X-BoneDetect-Timestamp"]) - time.time()) < 120
        summary = json.loads(body)
        assert summary["event"] == "job.finished" and summary["job_id"] == job["job_id"]
        assert summary["label"] == "night batch" and summary["status"] == "done"
        assert summary["counts"] == final["counts"] and summary["finished_at"] == final["finished_at"]
        assert summary["links"]["results_csv"] == f"/v1/jobs/{job['job_id']}/results.csv"
    assert receiver.calls[2][2] > receiver.calls[0][2], "retries come after the failures, not at once"


def test_sweep_sends_the_callback_of_a_job_no_worker_finished(start_system, tmp_path, monkeypatch, receivers):
    """Every file failed at upload: no chunk task runs, so the reconciler's sweep makes the callback due;
    a receiver that always fails gets 1 + CALLBACK_MAX_RETRIES attempts, then the state is 'failed'."""
    from bonedetect.queue import make_celery
    from db.session import make_engine, make_sessionmaker
    from worker.callbacks import sweep_callbacks

    monkeypatch.setenv("CALLBACK_BACKOFF_S", "1")
    monkeypatch.setenv("CALLBACK_BACKOFF_MAX_S", "1")
    monkeypatch.setenv("CALLBACK_MAX_RETRIES", "2")
    system = start_system(f"sqlite:///{tmp_path / 'bd.sqlite'}", f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    client = system.client("a")
    receiver = receivers([503])
    job = client.submit([("notes.txt", b"not an image")], callback_url=receiver.url)
    assert client.wait(job["job_id"], timeout=10)["status"] == "done_with_errors"

    engine = make_engine(system.settings.database_url)
    try:
        sessions, app = make_sessionmaker(engine), make_celery(system.settings)
        assert sweep_callbacks(sessions, app, system.settings) == 1
        assert sweep_callbacks(sessions, app, system.settings) == 0, "claimed once: a second round sends nothing"
    finally:
        engine.dispose()
    callback = wait_for_callback(client, job["job_id"], "failed")
    assert [(a["attempt"], a["status"], a["http_status"]) for a in callback["attempts"]] == [
        (1, "failed", 503), (2, "failed", 503), (3, "failed", 503),
    ]  # fmt: skip
    assert json.loads(receiver.calls[0][1])["status"] == "done_with_errors"


def test_a_finished_job_is_claimed_by_exactly_one_of_many_racing_workers(pg_url):
    """Eight connections run the claim on the same finished job at the same instant (PostgreSQL row
    locks decide); a job with an image still processing is claimed by none."""
    from concurrent.futures import ThreadPoolExecutor

    from db.migrate import upgrade
    from db.models import Image, Job
    from db.session import make_engine, make_sessionmaker
    from db.tenants import create_tenant
    from worker.callbacks import claim_finished

    upgrade(pg_url)
    engine = make_engine(pg_url, pool_size=8)
    sessions = make_sessionmaker(engine)
    try:
        with sessions.begin() as session:
            tenant, _ = create_tenant(session, "hospital-race")
            for job_id, statuses in (("finished", ["done", "failed"]), ("running", ["done", "processing"])):
                session.add(job := Job(tenant_id=tenant.id, callback_url="http://127.0.0.1:9/hook", label=job_id))
                session.flush()
                session.add_all(Image(job_id=job.id, tenant_id=tenant.id, position=i, status=s) for i, s in enumerate(statuses))
            ids = {j.label: j.id for j in session.scalars(select(Job))}
        barrier = threading.Barrier(8)

        def claim(_):
            with sessions.begin() as session:
                barrier.wait()
                return claim_finished(session, [ids["finished"], ids["running"]])

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(claim, range(8)))
        assert sorted(map(len, results)) == [0] * 7 + [1] and [ids["finished"]] in results
        with sessions() as session:
            states = {j.label: j.callback_state for j in session.scalars(select(Job))}
        assert states == {"finished": "pending", "running": None}
    finally:
        engine.dispose()
