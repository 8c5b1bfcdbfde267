"""One job sent in parts: open it, add parts (each committed whole and queued at
once), close it. The job is "receiving" until closed, whatever its images' states."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import select, update

import pytest

from bonedetect.client import encode_multipart
from db.jobs import close_idle_jobs
from db.models import Image, Job, JobPart, utcnow
from tests.api.conftest import png_bytes
from worker.callbacks import claim_finished


def open_job(api, fields=(), files=(), tenant="a", headers=None) -> dict:
    resp = api.submit(list(files), tenant=tenant, fields=[("open", "true"), *fields], headers=headers)
    assert resp.status_code == 202, resp.json
    return resp.json


def add_part(api, job_id, files, tenant="a", fields=(), headers=None, client=None):
    body, ctype = encode_multipart(list(fields), [("files", name, data) for name, data in files])
    return (client or api.client).post(f"/v1/jobs/{job_id}/images", data=body,
                                       headers={**api.auth(tenant), "Content-Type": ctype, **(headers or {})})


def pngs(prefix: str, n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{prefix}{i}.png", png_bytes(seed=seed + i)) for i in range(n)]


def blob_files(api) -> list:
    return [p for p in api.blobs.root.rglob("*") if p.is_file()]


def test_parts_are_queued_as_they_arrive_and_the_job_finishes_only_when_closed(api):
    job = open_job(api, fields=[("label", "night")])
    job_id = job["job_id"]
    assert job["image_count"] == 0 and job["parts_url"] == f"/v1/jobs/{job_id}/images"
    assert api.get(f"/v1/jobs/{job_id}").json["status"] == "receiving"

    first = add_part(api, job_id, pngs("a", 3))
    assert first.status_code == 202, first.json
    assert (first.json["first_position"], first.json["image_count"], first.json["accepted"]) == (0, 3, 3)
    queued_after_first = [i for chunk in api.broker.chunks for i in chunk]
    assert len(queued_after_first) == 3, "the first part is queued before the second is sent"

    second = add_part(api, job_id, pngs("b", 2, seed=10))
    assert (second.json["first_position"], second.json["image_count"]) == (3, 2)
    rows = api.rows(job_id)
    assert [(r.position, r.filename) for r in rows] == [(0, "a0.png"), (1, "a1.png"), (2, "a2.png"), (3, "b0.png"), (4, "b1.png")]
    assert not api.broker.uncommitted, "every queued id had a committed row"

    api.set_images([r.id for r in rows], status="done", finished_at=utcnow())
    got = api.get(f"/v1/jobs/{job_id}").json
    assert got["status"] == "receiving" and got["finished_at"] is None and got["counts"]["done"] == 5
    assert got["label"] == "night" and got["closed_at"] is None

    closed = api.client.post(f"/v1/jobs/{job_id}/close", headers=api.auth())
    assert closed.status_code == 200 and closed.json["status"] == "done" and closed.json["total"] == 5
    assert closed.json["closed_at"] is not None
    again = api.client.post(f"/v1/jobs/{job_id}/close", headers=api.auth())
    assert again.status_code == 200 and again.json["closed_at"] == closed.json["closed_at"], "closing is idempotent"


def test_a_closed_or_whole_job_takes_no_part_and_keeps_no_blob_of_it(api):
    job_id = open_job(api)["job_id"]
    add_part(api, job_id, pngs("a", 1))
    api.client.post(f"/v1/jobs/{job_id}/close", headers=api.auth())
    whole = api.submit(pngs("w", 1)).json["job_id"]
    before = sorted(blob_files(api))
    blobs = api.app.extensions["bonedetect"].blobs
    blobs.put_stream = lambda *a, **k: pytest.fail("a refused part is not stored, not even for a moment")
    late = add_part(api, job_id, pngs("late", 2))
    assert late.status_code == 409 and "is closed" in late.json["error"]
    refused = add_part(api, whole, pngs("x", 1))
    assert refused.status_code == 409 and "submitted whole" in refused.json["error"]
    del blobs.put_stream
    assert len(api.rows(job_id)) == 1 and len(api.rows(whole)) == 1
    assert sorted(blob_files(api)) == before


def test_a_part_whose_job_is_closed_while_it_arrives_is_refused_and_leaves_no_blob(any_db_api, monkeypatch):
    """The close lands after the part was checked and while its files are being stored: the part's
    UPDATE finds the job closed, answers 409 and deletes what it stored."""
    api = any_db_api
    job_id = open_job(api)["job_id"]
    blobs = api.app.extensions["bonedetect"].blobs
    real_put, calls = blobs.put_stream, []

    def put_then_close(key, stream, max_bytes=None):
        calls.append(key)
        if len(calls) == 1:  # another client closes the job, from its own thread and connection
            closed = []
            other = threading.Thread(target=lambda: closed.append(
                api.app.test_client().post(f"/v1/jobs/{job_id}/close", headers=api.auth()).status_code))
            other.start()
            other.join()
            assert closed == [200]
        return real_put(key, stream, max_bytes)

    monkeypatch.setattr(blobs, "put_stream", put_then_close)
    resp = add_part(api, job_id, pngs("a", 2))
    monkeypatch.undo()
    assert resp.status_code == 409 and "is closed" in resp.json["error"] and len(calls) == 2
    assert blob_files(api) == [] and api.rows(job_id) == [] and api.broker.tasks == []


def test_the_opening_request_may_carry_the_first_part(api):
    headers = {"Idempotency-Key": "night-1"}
    job = open_job(api, files=pngs("a", 2) + [("bad.txt", b"not an image")], headers=headers)
    assert (job["image_count"], job["accepted"]) == (3, 2)
    assert job["rejected"] == [{"position": 2, "filename": "bad.txt", "error": job["rejected"][0]["error"]}]
    part = add_part(api, job["job_id"], pngs("b", 2, seed=5)).json
    assert part["first_position"] == 3
    replay = api.submit(pngs("a", 2) + [("bad.txt", b"not an image")], fields=[("open", "true")], headers=headers)
    assert replay.status_code == 200 and replay.json["job_id"] == job["job_id"]
    assert (replay.json["image_count"], replay.json["accepted"]) == (3, 2), "the opening request's answer, not the job's"


def test_a_part_sent_again_with_its_key_is_answered_not_added_twice(api):
    job_id = open_job(api)["job_id"]
    files = pngs("a", 3)
    first = add_part(api, job_id, files, headers={"Idempotency-Key": "p1"})
    again = add_part(api, job_id, files, headers={"Idempotency-Key": "p1"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json == first.json
    assert len(api.rows(job_id)) == 3 and len(api.broker.chunks) == 2  # CHUNK_SIZE=2: queued once
    other = add_part(api, job_id, pngs("z", 3, seed=9), headers={"Idempotency-Key": "p1"})
    assert other.status_code == 422 and "different part" in other.json["error"]
    # the same key on another job is another part
    other_job = open_job(api)["job_id"]
    assert add_part(api, other_job, files, headers={"Idempotency-Key": "p1"}).status_code == 202


def test_a_corrupt_file_in_a_part_fails_alone_at_its_position(api):
    job_id = open_job(api)["job_id"]
    add_part(api, job_id, pngs("a", 2))
    part = add_part(api, job_id, [("ok.png", png_bytes(seed=3)), ("broken.png", b"\x00\x01garbage")]).json
    assert part["accepted"] == 1 and [r["position"] for r in part["rejected"]] == [3]
    rows = api.rows(job_id)
    assert rows[3].status == "failed" and rows[3].error and rows[2].status == "queued"


def test_a_part_takes_files_only_and_only_for_its_own_tenant(api):
    job_id = open_job(api)["job_id"]
    resp = add_part(api, job_id, pngs("a", 1), fields=[("label", "x")])
    assert resp.status_code == 400 and "label" in resp.json["error"]
    assert add_part(api, job_id, pngs("a", 1), tenant="b").status_code == 404
    assert add_part(api, job_id, []).status_code == 400
    assert api.client.post(f"/v1/jobs/{job_id}/close", headers=api.auth("b")).status_code == 404
    assert api.submit([], fields=[("open", "maybe")]).status_code == 400
    assert api.rows(job_id) == []


def test_cancelling_an_open_job_closes_it_and_it_ends_cancelled(api):
    job_id = open_job(api)["job_id"]
    add_part(api, job_id, pngs("a", 2))
    cancelled = api.client.delete(f"/v1/jobs/{job_id}", headers=api.auth())
    assert cancelled.status_code == 202 and cancelled.json["status"] == "cancelled"
    assert cancelled.json["counts"]["cancelled"] == 2
    late = add_part(api, job_id, pngs("b", 1))
    assert late.status_code == 409 and "cancelled" in late.json["error"]
    # with nothing unfinished (every image so far processed, or none sent): still cut short, not "done"
    done_so_far = open_job(api)["job_id"]
    add_part(api, done_so_far, pngs("c", 1))
    api.set_images([r.id for r in api.rows(done_so_far)], status="done", finished_at=utcnow())
    empty = open_job(api)["job_id"]
    for job in (done_so_far, empty):
        got = api.client.delete(f"/v1/jobs/{job}", headers=api.auth()).json
        assert got["status"] == "cancelled" and got["cancelled_at"] is not None, got


def test_the_callback_waits_for_the_close_even_for_code_from_before_parts(api):
    job = open_job(api, fields=[("callback_url", "https://hospital.example/hook")])
    add_part(api, job["job_id"], pngs("a", 2))
    api.set_images([r.id for r in api.rows(job["job_id"])], status="done", finished_at=utcnow())
    assert api.get(f"/v1/jobs/{job['job_id']}").json["callback"]["state"] == "waiting"

    def claim_as_before_parts(session) -> list[str]:  # worker/callbacks.py's claim before 0003: no `receiving`
        unfinished = select(Image.id).where(Image.job_id == Job.id, Image.status.in_(["queued", "processing"])).exists()
        return list(session.execute(
            update(Job).where(Job.callback_url.is_not(None), Job.callback_state.is_(None), ~unfinished)
            .values(callback_state="pending").returning(Job.id)).scalars())

    with api.sessions.begin() as session:
        assert claim_finished(session, [job["job_id"]]) == [], "every image is done, but more may come"
        assert claim_as_before_parts(session) == [], "a worker not yet upgraded does not announce it either"
    api.client.post(f"/v1/jobs/{job['job_id']}/close", headers=api.auth())
    with api.sessions.begin() as session:
        assert claim_finished(session, None) == [job["job_id"]]

    # a cancel, and the reconciler's idle close, release a held callback too
    hook = [("callback_url", "https://hospital.example/hook")]
    cancelled, idle = open_job(api, fields=hook)["job_id"], open_job(api, fields=hook)["job_id"]
    api.client.delete(f"/v1/jobs/{cancelled}", headers=api.auth())
    with api.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == idle).values(created_at=utcnow() - timedelta(hours=30)))
        assert close_idle_jobs(session, 24) == [idle]
    with api.sessions.begin() as session:
        assert sorted(claim_finished(session, None)) == sorted([cancelled, idle])


def test_a_job_left_open_is_cut_short_after_its_idle_hours(api):
    idle, busy, whole = open_job(api)["job_id"], open_job(api)["job_id"], api.submit(pngs("w", 1)).json["job_id"]
    add_part(api, idle, pngs("a", 2))
    long_ago = utcnow() - timedelta(hours=30)
    with api.sessions.begin() as session:
        session.execute(update(Job).where(Job.id.in_([idle, busy])).values(created_at=long_ago))
        session.execute(update(JobPart).where(JobPart.job_id == idle).values(created_at=long_ago))
    api.set_images([api.rows(idle)[0].id], status="done", finished_at=utcnow())
    add_part(api, busy, pngs("b", 1))  # a recent part keeps it open
    with api.sessions.begin() as session:
        assert close_idle_jobs(session, 0) == [], "0: never"
        assert close_idle_jobs(session, 24) == [idle]
    got = api.get(f"/v1/jobs/{idle}").json
    assert got["status"] == "cancelled" and got["counts"]["done"] == 1 and got["counts"]["cancelled"] == 1
    assert api.get(f"/v1/jobs/{busy}").json["status"] == "receiving"
    assert api.job_row(whole).receiving is False and api.job_row(whole).closed_at is None


def test_parts_sent_at_once_get_disjoint_positions(any_db_api):
    """Four clients send three parts each at the same time (threads, each with its own connection):
    every image gets one position, each part a consecutive range, and a close after them sees all."""
    api = any_db_api
    job_id = open_job(api)["job_id"]
    answers, errors = [], []
    start = threading.Barrier(4)

    def client(k: int) -> None:
        http = api.app.test_client()
        try:
            start.wait()
            for j in range(3):
                resp = add_part(api, job_id, pngs(f"c{k}p{j}-", 3, seed=10 * k + j), client=http)
                assert resp.status_code == 202, resp.json
                answers.append(resp.json)
        except Exception as err:  # noqa: BLE001  (reported below, with the others)
            errors.append(err)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ranges = sorted((a["first_position"], a["image_count"]) for a in answers)
    assert ranges == [(3 * i, 3) for i in range(12)]
    rows = api.rows(job_id)
    assert [r.position for r in rows] == list(range(36))
    for a in answers:  # a part's files sit together, in the order sent
        names = [r.filename for r in rows[a["first_position"] : a["first_position"] + 3]]
        assert len({n.split("-")[0] for n in names}) == 1 and names == sorted(names)
    closed = api.client.post(f"/v1/jobs/{job_id}/close", headers=api.auth()).json
    assert closed["total"] == 36 and api.job_row(job_id).image_count == 36
    with api.sessions() as session:
        assert session.scalar(select(JobPart.image_count).where(JobPart.job_id == job_id).limit(1)) == 3
    assert len({i for chunk in api.broker.chunks for i in chunk}) == 36


def test_a_part_that_fails_half_way_leaves_nothing(api, monkeypatch):
    """A part is committed whole or not at all: a blob store that fails on the second file leaves
    no row and no blob of that part, and the job goes on taking parts."""
    from tests.api.test_api_submit import fail_second_put

    job_id = open_job(api)["job_id"]
    add_part(api, job_id, pngs("a", 1))
    kept = blob_files(api)
    blobs = api.app.extensions["bonedetect"].blobs
    calls = fail_second_put(blobs, monkeypatch)
    resp = add_part(api, job_id, pngs("b", 3, seed=4))
    monkeypatch.undo()
    assert resp.status_code == 500 and len(calls) == 2
    assert sorted(blob_files(api)) == sorted(kept) and len(api.rows(job_id)) == 1
    assert add_part(api, job_id, pngs("c", 1, seed=8)).json["first_position"] == 1


def test_purging_a_job_sent_in_parts_removes_its_parts(api):
    job_id = open_job(api)["job_id"]
    add_part(api, job_id, pngs("a", 2), headers={"Idempotency-Key": "p1"})
    resp = api.client.delete(f"/v1/jobs/{job_id}?purge=true", headers=api.auth())
    assert resp.status_code == 200 and resp.json["images"] == 2
    with api.sessions() as session:
        assert session.scalars(select(JobPart)).all() == []
    assert blob_files(api) == []


def test_an_expired_lease_in_a_cancelled_job_is_cancelled_not_queued_again(api):
    """A worker died holding an image of a job cut short meanwhile: the reconciler cancels the image
    (nothing would ever take it again: claims and re-enqueues skip cancelled jobs), so the job ends."""
    from bonedetect.queue import make_celery
    from worker.reconciler import reconcile_once

    job_id = open_job(api)["job_id"]
    add_part(api, job_id, pngs("a", 2))
    rows = api.rows(job_id)
    api.set_images([rows[0].id], status="processing", lease_expires_at=utcnow() - timedelta(seconds=5))
    assert api.client.delete(f"/v1/jobs/{job_id}", headers=api.auth()).json["status"] == "processing"
    result = reconcile_once(api.sessions, make_celery(api.settings), api.settings)
    assert result["cancelled_expired"] == 1 and result["expired_leases"] == 0
    got = api.get(f"/v1/jobs/{job_id}").json
    assert got["status"] == "cancelled" and got["counts"]["cancelled"] == 2
