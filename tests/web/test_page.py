"""The web page in real headless Chromium against the real system (embedded
mode: SQLite, kombu's SQLite broker, a Celery worker process).

    BONEDETECT_SCREENSHOT=docs/screenshot.png python -m pytest tests/web -k two_radiographs
        also saves the README's screenshot of the finished job
"""

from __future__ import annotations

import base64
import csv
import io
import os
import time

import numpy as np
import pytest

from tests.integration.conftest import synthetic_jpegs

SPACING_MM = 0.2

ALL_IMAGES_LOADED = """(n) => {
    const imgs = [...document.querySelectorAll('.image-card .view-img')];
    return imgs.length === n && imgs.every((i) => !i.hidden && i.complete && i.naturalWidth > 0);
}"""

DROP_FILES = """(files) => {
    const dt = new DataTransfer();
    for (const f of files) {
        const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
        dt.items.add(new File([bytes], f.name, { type: f.type }));
    }
    return dt;
}"""


def synthetic_dicom(seed: int) -> bytes:
    """A synthetic radiograph as an 8-bit MONOCHROME2 DICOM file with a calibrated PixelSpacing."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from training.synthetic import synthetic_radiograph

    image, _, _ = synthetic_radiograph(np.random.default_rng(seed), 320, 400)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CR"
    ds.set_pixel_data(image, "MONOCHROME2", 8, generate_instance_uid=False)
    ds.PixelSpacing = [SPACING_MM, SPACING_MM]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def embedded(start_system, tmp_path, workers=1):
    return start_system(f"sqlite:///{tmp_path / 'bd.sqlite'}", f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}", workers=workers)


def sign_in(page, url: str, key: str) -> None:
    page.goto(url + "/")
    page.fill("#key-input", key)
    page.click("#key-submit")
    page.wait_for_selector("#app", state="visible")


def test_two_radiographs_dropped_on_the_page_reach_done_with_their_overlays_and_areas(start_system, tmp_path, browser_page):
    t0 = time.monotonic()
    system = embedded(start_system, tmp_path)
    page = browser_page
    sign_in(page, system.api_url, system.keys["a"])

    (jpeg,), _ = synthetic_jpegs(1, seed=31)
    files = [("knee-ap.jpg", jpeg[1], "image/jpeg"), ("femur-lat.dcm", synthetic_dicom(seed=32), "application/dicom")]
    payload = [{"name": name, "b64": base64.b64encode(data).decode(), "type": kind} for name, data, kind in files]
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": page.evaluate_handle(DROP_FILES, payload)})
    assert page.inner_text("#submit-files") == "Analyze 2 files"
    page.fill("#label-input", "Ward 4 · morning batch")
    page.click("#submit-files")

    page.wait_for_selector('#job-status[data-status="done"]', timeout=180_000)
    page.wait_for_function(ALL_IMAGES_LOADED, arg=2)
    assert page.inner_text("#progress-text").startswith("2 / 2")

    client = system.client("a")
    (job,) = client.get_json("/v1/jobs")["jobs"]
    images = list(client.images(job["job_id"]))
    assert page.inner_text("#job-id") == job["job_id"]
    assert "synthetic, not for clinical use" in page.inner_text("#model-line")
    for im in images:
        card = page.locator(f'.image-card[data-image-id="{im["image_id"]}"]')
        assert card.locator(".filename").inner_text() == im["filename"]
        # the overlay at the image's own size, and the area as the API measured it
        size = card.locator(".view-img").evaluate("(i) => [i.naturalWidth, i.naturalHeight]")
        assert size == [im["width"], im["height"]]
        assert card.locator(".stat-area-px").inner_text().startswith(f"{im['area_px']:,} px")
        assert card.locator(".stat-detected").inner_text() == ("Yes" if im["tumor_detected"] else "No")
        original = card.locator('.views button[data-view="source"]')
        if im["filename"].endswith(".dcm"):
            assert im["area_mm2"] == pytest.approx(im["area_px"] * SPACING_MM**2)
            assert card.locator(".stat-area-mm2").inner_text().startswith(f"{im['area_mm2']:.1f} mm²")
            assert original.is_disabled(), "a browser cannot show DICOM: the overlay stands in"
        else:
            assert card.locator(".stat-area-mm2").inner_text() == "— no pixel spacing", "a JPEG carries no spacing"
            assert original.is_enabled()

    if path := os.environ.get("BONEDETECT_SCREENSHOT"):
        page.wait_for_timeout(600)  # the progress bar's transition
        page.screenshot(path=path, full_page=True)

    # the other views of the first card: the mask and the uploaded original
    first = page.locator(".image-card").first
    for view in ("mask", "source"):
        first.locator(f'.views button[data-view="{view}"]').click()
        page.wait_for_function(
            "([card, view]) => { const b = document.querySelector(`.image-card[data-image-id='${card}'] .views button.active`);"
            " const i = document.querySelector(`.image-card[data-image-id='${card}'] .view-img`);"
            " return b && b.dataset.view === view && i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:'); }",
            arg=[images[0]["image_id"], view],
        )

    # the CSV, fetched with the key and saved by the browser
    with page.expect_download() as download:
        page.click("#download-csv")
    rows = list(csv.DictReader(io.StringIO(open(download.value.path(), encoding="utf-8").read())))
    assert {r["filename"]: int(r["area_px"]) for r in rows} == {im["filename"]: im["area_px"] for im in images}

    # the earlier jobs list, and the key kept for the browser session across a reload
    assert page.locator(f'#jobs-body tr[data-job-id="{job["job_id"]}"]').inner_text().count("Ward 4") == 1
    page.reload()
    page.wait_for_selector("#app", state="visible")
    page.wait_for_selector('#job-status[data-status="done"]')
    assert page.is_hidden("#login")

    assert page.errors == [], page.errors
    origin = system.api_url
    assert all(u.startswith((origin, "blob:", "data:")) for u in page.requested), "nothing fetched from elsewhere"
    print(f"browser test: {time.monotonic() - t0:.1f} s from start-up to the reloaded page")


def test_a_wrong_key_is_refused_and_a_rejected_file_is_explained(start_system, tmp_path, browser_page):
    system = embedded(start_system, tmp_path, workers=0)
    page = browser_page
    page.goto(system.api_url + "/")
    page.fill("#key-input", "bd_not-a-real-key")
    page.click("#key-submit")
    page.wait_for_selector("#key-error", state="visible")
    assert "not accepted" in page.inner_text("#key-error")
    assert page.is_hidden("#app")

    sign_in(page, system.api_url, system.keys["a"])
    # the file chooser this time, rather than a drop
    page.set_input_files("#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}])
    page.click("#submit-files")
    page.wait_for_selector('#job-status[data-status="done_with_errors"]')
    card = page.locator(".image-card").first
    card.locator(".image-error").wait_for()
    assert "unsupported file type" in card.locator(".image-error").inner_text()
    assert card.locator('.views button[data-view="overlay"]').is_disabled()
    assert "rejected" in page.inner_text("#upload-status")


def test_a_large_drop_goes_as_one_job_in_parts(start_system, tmp_path, browser_page):
    """70 radiographs (more than the page's 64 per part): one job, opened, sent in two parts, closed;
    it reaches done with every file in the order dropped."""
    system = embedded(start_system, tmp_path)
    page = browser_page
    sign_in(page, system.api_url, system.keys["a"])
    files, _ = synthetic_jpegs(70, seed=41)
    payload = [{"name": name, "b64": base64.b64encode(data).decode(), "type": "image/jpeg"} for name, data in files]
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": page.evaluate_handle(DROP_FILES, payload)})
    assert page.inner_text("#submit-files") == "Analyze 70 files"
    page.click("#submit-files")
    page.wait_for_selector('#job-status[data-status="done"]', timeout=300_000)
    assert "Submitted 70 file(s) in 2 parts" in page.inner_text("#upload-status")

    client = system.client("a")
    (job,) = client.get_json("/v1/jobs")["jobs"]
    assert job["total"] == 70 and job["counts"]["done"] == 70
    assert job["closed_at"] is not None, "sent in parts: opened, then closed"
    assert [im["filename"] for im in client.images(job["job_id"])] == [name for name, _ in files]
    assert page.inner_text("#job-id") == job["job_id"]
    assert page.errors == [], page.errors
