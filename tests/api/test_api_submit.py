"""POST /v1/jobs: blobs, rows, one commit, then the chunk tasks."""

from __future__ import annotations

import json
import os
import threading

import pytest
from sqlalchemy import func, select

from api.uploads import sanitize_filename
from bonedetect.client import encode_multipart
from db.blobstore import image_prefix
from db.models import Job
from tests.api.conftest import build_api, jpeg_bytes, png_bytes

TEXT = b"this is a text file, not a radiograph\n"
NOT_AN_IMAGE = "unsupported file type: not a PNG or JPEG image, nor a DICOM file"


def test_submit_stores_blobs_commits_rows_then_enqueues_chunks(api):
    files = [("a.png", png_bytes(seed=1)), ("b.jpg", jpeg_bytes(seed=2)), ("notes.jpg", TEXT)]
    files.append(("c.png", png_bytes(seed=3)))
    resp = api.submit(files, fields=[("label", "night batch")])

    assert resp.status_code == 202
    body = resp.json
    job_id = body["job_id"]
    assert body == {
        "job_id": job_id,
        "status_url": f"/v1/jobs/{job_id}",
        "image_count": 4,
        "accepted": 3,
        "rejected": [{"position": 2, "filename": "notes.jpg", "error": NOT_AN_IMAGE}],
    }
    assert resp.headers["Location"] == f"/v1/jobs/{job_id}"

    rows = api.rows(job_id)
    assert [(r.position, r.filename, r.status) for r in rows] == [
        (0, "a.png", "queued"), (1, "b.jpg", "queued"), (2, "notes.jpg", "failed"), (3, "c.png", "queued"),
    ]  # fmt: skip
    failed = rows[2]
    assert failed.error == "unsupported file type: not a PNG or JPEG image, nor a DICOM file"
    assert failed.finished_at is not None and failed.blob_key is None and failed.size_bytes == len(TEXT)
    for row, (_, data) in zip(rows, files, strict=True):
        assert row.size_bytes == len(data) and row.tenant_id == rows[0].tenant_id
        if row.status == "queued":
            assert row.blob_key == image_prefix(row.tenant_id, job_id, row.id) + "/source"
            assert api.blobs.get_bytes(row.blob_key) == data
    assert [r.content_type for r in rows] == ["image/png", "image/jpeg", None, "image/png"]
    assert api.job_row(job_id).label == "night batch"

    queued_ids = [r.id for r in rows if r.status == "queued"]
    assert api.broker.chunks == [queued_ids[:2], queued_ids[2:]], "chunks of CHUNK_SIZE=2, in order"
    assert api.broker.uncommitted == [], "every enqueued id had a committed row when the task was sent"


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"GIF89a" + bytes(64), "unsupported file type: not a PNG or JPEG image, nor a DICOM file"),
        (b"\xff\xd8", "unsupported file type: not a PNG or JPEG image, nor a DICOM file"),
    ],
)
def test_unsupported_file_fails_alone_with_its_reason(api, data, reason):
    resp = api.submit([("x.jpg", data), ("ok.png", png_bytes())])
    assert resp.status_code == 202 and resp.json["accepted"] == 1
    bad, good = api.rows(resp.json["job_id"])
    assert (bad.status, bad.error) == ("failed", reason)
    assert good.status == "queued"
    assert api.broker.chunks == [[good.id]]


def test_dicom_is_accepted_for_the_worker_to_decode(api):
    resp = api.submit([("study.dcm", bytes(128) + b"DICM" + bytes(64))])
    assert resp.status_code == 202 and resp.json["accepted"] == 1
    (row,) = api.rows(resp.json["job_id"])
    assert (row.status, row.content_type) == ("queued", "application/dicom")


def test_all_files_rejected_enqueues_nothing(api):
    resp = api.submit([("a.txt", TEXT)])
    assert resp.status_code == 202 and resp.json["accepted"] == 0
    assert api.broker.tasks == []
    assert api.get(resp.json["status_url"]).json["status"] == "done_with_errors"


def test_external_ids_repeated_fields_or_json_list(api):
    files = [("a.png", png_bytes()), ("b.png", png_bytes())]
    job = api.submit(files, fields=[("external_id", "acc-1"), ("external_id", "acc-2")]).json["job_id"]
    assert [r.external_id for r in api.rows(job)] == ["acc-1", "acc-2"]
    job = api.submit(files, fields=[("external_ids", json.dumps(["x", None]))]).json["job_id"]
    assert [r.external_id for r in api.rows(job)] == ["x", None]

    resp = api.submit(files, fields=[("external_id", "only-one")])
    assert resp.status_code == 400 and "2 files" in resp.json["error"]
    resp = api.submit(files, fields=[("external_ids", "not json")])
    assert resp.status_code == 400 and resp.is_json


def test_filename_is_sanitised(api):
    long_name = "x" * 400 + ".png"
    names = ["../../etc/pass\x00wd", "scans/knee\x07\x1b.jpg", "röntgen-левая-手 \u202e.png", long_name, ".."]
    resp = api.submit([(n, png_bytes()) for n in names])
    assert resp.status_code == 202
    stored = [r.filename for r in api.rows(resp.json["job_id"])]
    assert stored[:3] == ["passwd", "knee.jpg", "röntgen-левая-手 .png"]
    assert len(stored[3]) == 300 and stored[3].endswith(".png")
    assert stored[4] is None


def test_windows_paths_keep_only_the_base_name():
    assert sanitize_filename("C:\\Users\\dr\\knee.jpg") == "knee.jpg"
    assert sanitize_filename("\\\\server\\share\\..\\hip.png") == "hip.png"
    assert sanitize_filename("\x00\x01") is None


def test_limits_answer_json(tmp_path, sqlite_url):
    small = build_api(tmp_path, sqlite_url, MAX_FILES_PER_JOB="2", MAX_FILE_BYTES="2000", MAX_REQUEST_BYTES="100000")
    try:
        resp = small.submit([("a.png", png_bytes()), ("b.png", png_bytes()), ("c.png", png_bytes())])
        assert resp.status_code == 400 and resp.json == {"error": "3 files is above the limit of 2 per job"}

        resp = small.submit([("a.png", png_bytes()), ("big.png", png_bytes(200, 200))])
        assert resp.status_code == 413
        assert resp.json == {"error": "file 'big.png' is larger than the limit of 2000 bytes"}

        resp = small.submit([("a.png", b"\x89PNG\r\n\x1a\n" + bytes(150_000))])
        assert resp.status_code == 413 and "above the limit of 100000 bytes" in resp.json["error"]

        resp = small.submit([], fields=[("label", "nothing")])
        assert resp.status_code == 400 and resp.json["error"].startswith("no files")

        resp = small.client.post("/v1/jobs", json={"files": []}, headers=small.auth())
        assert resp.status_code == 415 and "multipart/form-data" in resp.json["error"]

        resp = small.submit([("a.png", png_bytes())], fields=[("label", "x" * 201)])
        assert resp.status_code == 400 and resp.json == {"error": "label is longer than 200 characters"}

        with small.sessions() as session:
            assert session.scalar(select(func.count()).select_from(Job)) == 0, "a refused submission leaves no job"
        assert small.broker.tasks == []
        assert not list((tmp_path / "blobs").rglob("source")), "and no blobs"
    finally:
        small.close()


def fail_second_put(blobs, monkeypatch) -> list[str]:
    """The blob store's second put_stream raises OSError("disk full"); returns the keys it was asked for."""
    real_put, calls = blobs.put_stream, []

    def put_then_fail(key, stream, max_bytes=None):
        calls.append(key)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_put(key, stream, max_bytes)

    monkeypatch.setattr(blobs, "put_stream", put_then_fail)
    return calls


def test_failure_before_commit_leaves_no_rows_and_no_blobs(api, monkeypatch):
    blobs = api.app.extensions["bonedetect"].blobs
    calls = fail_second_put(blobs, monkeypatch)
    resp = api.submit([("a.png", png_bytes()), ("b.png", png_bytes()), ("c.png", png_bytes())])
    assert resp.status_code == 500 and resp.json == {"error": "internal server error"}
    with api.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    job_dir = calls[0].split("/", 4)[:4]  # tenants/<t>/jobs/<job>
    assert not blobs._path("/".join(job_dir)).exists()
    assert api.broker.tasks == []


def test_database_lost_at_commit_answers_503_and_deletes_the_blobs(api, monkeypatch):
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    def lost(self):
        raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection unexpectedly"))

    monkeypatch.setattr(Session, "commit", lost)
    resp = api.submit([("a.png", png_bytes()), ("b.png", png_bytes())])
    monkeypatch.undo()
    assert resp.status_code == 503 and resp.json == {"error": "database unavailable, retry later"}
    assert resp.headers["Retry-After"] == "5"
    assert not list((api.blobs.root).rglob("source"))
    with api.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert api.broker.tasks == []


def test_broker_down_still_answers_202_and_leaves_images_queued(api):
    api.broker.fail = True
    resp = api.submit([("a.png", png_bytes())])
    assert resp.status_code == 202
    assert [r.status for r in api.rows(resp.json["job_id"])] == ["queued"], "the reconciler will re-enqueue it"


def test_idempotency_key_returns_the_same_job(api):
    files = [("a.png", png_bytes()), ("t.txt", TEXT)]
    first = api.submit(files, headers={"Idempotency-Key": "night-2024-05-01"})
    again = api.submit(files, headers={"Idempotency-Key": "night-2024-05-01"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json == first.json and again.headers["Location"] == first.headers["Location"]
    assert len(api.broker.tasks) == 1, "the replay enqueued nothing"
    other = api.submit(files, tenant="b", headers={"Idempotency-Key": "night-2024-05-01"})
    assert other.status_code == 202 and other.json["job_id"] != first.json["job_id"], "keys are per tenant"
    with api.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 2


def test_idempotency_key_reused_for_another_batch_is_422_and_makes_nothing(api):
    files = [("a.png", png_bytes(seed=1)), ("b.png", png_bytes(seed=2))]
    first = api.submit(files, fields=[("label", "night")], headers={"Idempotency-Key": "k-7"})
    assert first.status_code == 202
    job_id = first.json["job_id"]
    for other_files, label in (
        ([("a.png", png_bytes(seed=1)), ("b.png", png_bytes(seed=3))], "night"),  # other pixels
        ([("a.png", png_bytes(seed=1)), ("c.png", png_bytes(seed=2))], "night"),  # another name
        ([files[1], files[0]], "night"),  # another order
        (files, "day"),  # another label
        (files[:1], "night"),  # fewer files
    ):
        resp = api.submit(other_files, fields=[("label", label)], headers={"Idempotency-Key": "k-7"})
        assert resp.status_code == 422, (label, resp.json)
        assert "already used for a different submission" in resp.json["error"] and job_id in resp.json["error"]
    again = api.submit(files, fields=[("label", "night")], headers={"Idempotency-Key": "k-7"})
    assert again.status_code == 200 and again.json["job_id"] == job_id, "the very same request is still a replay"
    with api.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
    assert len(list((api.blobs.root / "tenants").rglob("source"))) == 2, "no blobs left from the refused requests"
    assert len(api.broker.tasks) == 1


def test_idempotency_race_loser_answers_the_winners_job(api, monkeypatch):
    """Two requests with one key both pass the lookup; the unique constraint decides."""
    from api import jobs

    winner = {}
    real_parse = jobs.parse_submission

    def parse_then_lose_the_race(request, settings):
        sub = real_parse(request, settings)
        with api.sessions.begin() as session:  # the other request commits first
            job = Job(tenant_id=jobs.tenant_id(), idempotency_key="k1", image_count=0)
            session.add(job)
            session.flush()
            winner["id"] = job.id
        return sub

    monkeypatch.setattr(jobs, "parse_submission", parse_then_lose_the_race)
    resp = api.submit([("a.png", png_bytes())], headers={"Idempotency-Key": "k1"})
    assert resp.status_code == 200 and resp.json["job_id"] == winner["id"]
    tenant_dir = api.blobs.root / "tenants"
    assert not list(tenant_dir.rglob("source")), "the loser's blobs are deleted"
    assert api.broker.tasks == []


def test_default_enqueue_sends_chunk_tasks_by_name_to_the_broker(tmp_path, sqlite_url):
    """No injected enqueue: the lazily made Celery app publishes to the embedded broker."""
    from api import create_app
    from bonedetect.queue import SEGMENT_TASK

    built = build_api(tmp_path, sqlite_url, BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    app = create_app(built.settings)
    services = app.extensions["bonedetect"]
    assert services._celery is None, "no broker connection at start-up"
    body, ctype = encode_multipart([], [("files", f"{i}.png", png_bytes(seed=i)) for i in range(3)])
    resp = app.test_client().post("/v1/jobs", data=body, headers={**built.auth(), "Content-Type": ctype})
    assert resp.status_code == 202
    ids = [r.id for r in built.rows(resp.json["job_id"])]

    received = []
    with services.celery.connection_for_read() as conn:
        queue = conn.SimpleQueue(built.settings.queue_name)
        for _ in range(2):
            message = queue.get(timeout=5)
            received.append((message.headers["task"], message.payload[0][0]))
            message.ack()
        queue.close()
    assert received == [(SEGMENT_TASK, ids[:2]), (SEGMENT_TASK, ids[2:])]
    services.engine.dispose()
    built.close()


def test_concurrent_submissions_get_distinct_jobs(api):
    results = []

    def submit(i):
        with api.app.test_client() as client:
            body, ctype = encode_multipart([], [("files", f"{i}.png", png_bytes(seed=i))])
            results.append(client.post("/v1/jobs", data=body, headers={**api.auth(), "Content-Type": ctype}))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [202] * 6
    assert len({r.json["job_id"] for r in results}) == 6


def test_uploads_are_written_once_into_the_blob_store(tmp_path, sqlite_url, monkeypatch):
    """A file part past 500 KB goes straight into the local store's folder as an
    unnamed file and is stored by a link; the parts of a refused request, or
    rejected files, are closed with the request and leave nothing on disk."""
    small = build_api(tmp_path, sqlite_url, MAX_FILE_BYTES="2000000")
    blobs = small.app.extensions["bonedetect"].blobs
    made, real = [], blobs.staging_file
    monkeypatch.setattr(blobs, "staging_file", lambda: made.append(real()) or made[-1])
    inodes, real_open = [], blobs._open_unnamed

    def open_unnamed():
        fd = real_open()
        inodes.append(fd is not None and os.fstat(fd).st_ino)
        return fd

    monkeypatch.setattr(blobs, "_open_unnamed", open_unnamed)
    big = [b"\x89PNG\r\n\x1a\n" + bytes([i]) * 1_500_000 for i in range(3)]  # radiograph-sized; decoded by workers
    try:
        files = [("a.png", big[0]), ("small.png", png_bytes(seed=1)), ("notes.txt", TEXT), ("b.png", big[1])]
        resp = small.submit(files)
        assert resp.status_code == 202 and len(made) == 4
        if made[0].unnamed_fd is None:
            pytest.skip("the blob store's filesystem has no O_TMPFILE")
        rows = small.rows(resp.json["job_id"])
        stored = [os.stat(blobs.root / r.blob_key) for r in rows if r.blob_key]
        assert [blobs.get_bytes(r.blob_key) for r in rows if r.blob_key] == [big[0], files[1][1], big[1]]
        assert [f.unnamed_fd is not None for f in made] == [True, False, False, True], "staged past 500 KB only"
        assert all(f.closed for f in made), "every part is closed when the request ends"
        assert [st.st_ino for st in stored[::2]] == inodes, "the big ones linked"
        assert stored[1].st_ino not in inodes, "the small one copied from memory"
        assert {st.st_nlink for st in stored} == {1}, "no temporary names left beside them"

        # a file fails to store after others were linked: the request answers 500 and leaves nothing
        made.clear()
        real_put = blobs.put_stream
        fail_second_put(blobs, monkeypatch)
        resp = small.submit([("c.png", big[2]), ("d.png", big[2])])
        assert resp.status_code == 500 and len(made) == 2 and all(f.closed for f in made)
        monkeypatch.setattr(blobs, "put_stream", real_put)

        made.clear()
        resp = small.submit([("e.png", big[2]), ("huge.png", big[2] * 2)])
        assert resp.status_code == 413 and len(made) == 2 and all(f.closed for f in made)
        on_disk = sorted(p.relative_to(blobs.root).parts[-1] for p in blobs.root.rglob("*") if p.is_file())
        assert on_disk == ["source"] * 3, "the first job's three files only: nothing of the refused requests"
    finally:
        small.close()
