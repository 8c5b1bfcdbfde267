"""The worker's writes and the reconciler's view of the broker, against a real
PostgreSQL and a real Redis, without a model: a stale claim (a worker that
was presumed dead) never overwrites the newer claim's result, a result write
waits out a database restart, and an emptied Redis queue reads as empty."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
from sqlalchemy import select, update

from bench.services import PrivatePostgres
from bonedetect.queue import enqueue_chunks, make_celery
from bonedetect.settings import Settings
from db.blobstore import image_prefix, open_blob_store
from db.migrate import upgrade
from db.models import Image, Job, utcnow
from db.session import make_engine, make_sessionmaker
from db.tenants import create_tenant
from model.stats import tumor_statistics
from worker.pipeline import ImageResult, encode_png
from worker.reconciler import broker_queue_length
from worker.tasks import WorkerContext, claim, renew_leases, retry_database, write_results

pytestmark = pytest.mark.integration


def context(tmp_path, database_url: str, lease_s: int = 60) -> WorkerContext:
    upgrade(database_url)
    settings = Settings.from_env(
        {
            "BONEDETECT_HOME": str(tmp_path),
            "DATABASE_URL": database_url,
            "BLOB_URL": f"file://{tmp_path / 'blobs'}",
            "LEASE_S": str(lease_s),
        }  # fmt: skip
    )
    engine = make_engine(database_url, connect_args={"connect_timeout": 5})
    return WorkerContext(settings, make_sessionmaker(engine), open_blob_store(settings.blob_url), None, "test-model")


def queued_images(ctx: WorkerContext, n: int) -> list[str]:
    """A job of n queued images with their source blobs, as the API leaves it."""
    with ctx.sessions.begin() as session:
        tenant, _ = create_tenant(session, f"hospital-{uuid.uuid4().hex[:6]}")
        job = Job(tenant_id=tenant.id, image_count=n)
        session.add(job)
        session.flush()
        ids = []
        for position in range(n):
            image = Image(job_id=job.id, tenant_id=tenant.id, position=position, status="queued")
            session.add(image)
            session.flush()
            image.blob_key = image_prefix(tenant.id, job.id, image.id) + "/source"
            ctx.blobs.put_bytes(image.blob_key, b"\x89PNG\r\n\x1a\n...")
            ids.append(image.id)
    return ids


def result(image_id: str, square: int) -> ImageResult:
    """What the pipeline returns for a 64 x 64 image whose mask is a square of side `square`."""
    mask = np.zeros((64, 64), np.uint8)
    mask[:square, :square] = 1
    prob = mask.astype(np.float32) * 0.9
    return ImageResult(
        image_id, width=64, height=64, stats=tumor_statistics(mask, prob), mask_png=encode_png(mask * 255),
        overlay_png=encode_png(np.dstack([mask * 255] * 3)), processing_ms=1.0, source_format="PNG",
    )  # fmt: skip


def test_a_stale_claim_writes_nothing_and_the_newer_claim_wins(tmp_path, pg_url):
    ctx = context(tmp_path, pg_url)
    ids = queued_images(ctx, 2)
    first = claim(ctx, ids)
    assert [c.attempt for c in first] == [1, 1]
    assert claim(ctx, ids) == [], "a live lease is not claimed twice"

    with ctx.sessions.begin() as session:  # the first worker stops renewing: its leases run out
        session.execute(update(Image).where(Image.id.in_(ids)).values(lease_expires_at=utcnow()))
    second = claim(ctx, ids)
    assert [c.attempt for c in second] == [2, 2]

    assert write_results(ctx, first, [result(i, 10) for i in ids]) == 0, "the presumed-dead worker writes nothing"
    assert renew_leases(ctx, first) == 0
    assert renew_leases(ctx, second) == 2
    assert write_results(ctx, second, [result(i, 20) for i in ids]) == 2
    assert write_results(ctx, second, [result(i, 30) for i in ids]) == 0, "a redelivered task changes nothing"

    with ctx.sessions() as session:
        rows = session.scalars(select(Image).where(Image.id.in_(ids))).all()
    for row in rows:
        assert (row.status, row.area_px, row.attempts, row.lease_expires_at) == ("done", 400, 2, None)
        mask = ctx.blobs.get_bytes(row.mask_key)
        assert mask == result(row.id, 20).mask_png, "the mask on disk is the one the row describes"


def test_a_chunk_of_every_kind_of_result_writes_each_row_its_own_values(tmp_path, pg_url):
    """The rows of one chunk are written by one statement per kind (done, done with a pixel spacing,
    failed), each for all its rows at once: every row still gets its own values, and a row that another
    claim took over in the meantime is left as that claim has it."""
    import dataclasses

    ctx = context(tmp_path, pg_url)
    ids = queued_images(ctx, 6)
    claimed = claim(ctx, ids)
    with ctx.sessions.begin() as session:  # ids[5]'s lease ran out and another worker claimed it
        session.execute(update(Image).where(Image.id == ids[5]).values(lease_expires_at=utcnow()))
    assert [c.attempt for c in claim(ctx, [ids[5]])] == [2]
    results = [
        result(ids[0], 10),
        dataclasses.replace(result(ids[1], 20), pixel_spacing_mm=(0.1, 0.2), spacing_source="PixelSpacing"),
        ImageResult(ids[2], error="not a JPEG, PNG or DICOM file", processing_ms=2.0),
        result(ids[3], 30),
        dataclasses.replace(result(ids[4], 40), pixel_spacing_mm=(0.5, 0.25), spacing_source="ImagerPixelSpacing"),
        result(ids[5], 50),
    ]
    assert write_results(ctx, claimed, results) == 5

    with ctx.sessions() as session:
        rows = {r.id: r for r in session.scalars(select(Image).where(Image.id.in_(ids)))}
    got = {i: (rows[i].status, rows[i].area_px, rows[i].pixel_spacing_mm, rows[i].spacing_col_mm, rows[i].area_mm2,
               rows[i].spacing_source, rows[i].error) for i in ids}
    assert got == {
        ids[0]: ("done", 100, None, None, None, None, None),
        ids[1]: ("done", 400, 0.1, 0.2, None, "PixelSpacing", None),
        ids[2]: ("failed", None, None, None, None, None, "not a JPEG, PNG or DICOM file"),
        ids[3]: ("done", 900, None, None, None, None, None),
        ids[4]: ("done", 1600, 0.5, 0.25, None, "ImagerPixelSpacing", None),
        ids[5]: ("processing", None, None, None, None, None, None),
    }
    assert [rows[i].processing_ms for i in ids[:5]] == [1.0, 1.0, 2.0, 1.0, 1.0]
    assert rows[ids[2]].mask_key is None and rows[ids[3]].mask_key.endswith(f"{ids[3]}/mask.png")
    assert ctx.blobs.get_bytes(rows[ids[3]].mask_key) == result(ids[3], 30).mask_png
    assert all(rows[i].lease_expires_at is None and rows[i].finished_at is not None for i in ids[:5])
    assert rows[ids[5]].attempts == 2 and rows[ids[5]].lease_expires_at is not None and rows[ids[5]].mask_key is None

    # an image whose result came twice, after another done one: its first result stands, as one UPDATE each left it
    other, twice = queued_images(ctx, 2)
    results = [result(other, 10), ImageResult(twice, error="truncated JPEG", processing_ms=1.0), result(twice, 10)]
    assert write_results(ctx, claim(ctx, [other, twice]), results) == 2
    with ctx.sessions() as session:
        assert dict(session.execute(select(Image.id, Image.status).where(Image.id.in_([other, twice]))).all()) == {
            other: "done", twice: "failed"}


def test_a_lazy_rerun_removes_the_overlay_an_earlier_attempt_left(tmp_path, pg_url):
    """An eager worker stored its blobs and died before its commit; a lazy worker (OVERLAYS=lazy) redoes
    the image with another mask: the old overlay must not be served beside the new mask."""
    import dataclasses

    ctx = context(tmp_path, pg_url)
    ids = queued_images(ctx, 2)
    first = claim(ctx, ids)
    with ctx.sessions() as session:
        rows = {r.id: r for r in session.scalars(select(Image).where(Image.id.in_(ids)))}
    for i in ids:  # what the eager worker got to write before it died
        prefix = image_prefix(rows[i].tenant_id, rows[i].job_id, i)
        ctx.blobs.put_bytes(f"{prefix}/overlay.png", result(i, 10).overlay_png)
    with ctx.sessions.begin() as session:
        session.execute(update(Image).where(Image.id.in_(ids)).values(lease_expires_at=utcnow()))
    second = claim(ctx, ids)
    lazy = [dataclasses.replace(result(i, 20), overlay_png=None) for i in ids]
    assert write_results(ctx, second, lazy) == 2
    for i in ids:
        prefix = image_prefix(rows[i].tenant_id, rows[i].job_id, i)
        assert not ctx.blobs.exists(f"{prefix}/overlay.png"), "the old mask's overlay is gone; the API renders anew"
        assert ctx.blobs.get_bytes(f"{prefix}/mask.png") == result(i, 20).mask_png
    assert [c.attempt for c in first] == [1, 1]


def test_a_result_write_waits_out_a_database_restart(tmp_path, private_postgres_available):
    with PrivatePostgres() as pg:
        ctx = context(tmp_path, pg.create_database())
        ids = queued_images(ctx, 3)
        claimed = claim(ctx, ids)
        pg.stop("fast")  # the database goes away while the chunk is being segmented
        restarted = threading.Timer(2.0, pg.start)
        restarted.start()
        t0 = time.monotonic()
        written = retry_database(lambda: write_results(ctx, claimed, [result(i, 8) for i in ids]), "write", 60)
        restarted.join()
        assert written == 3 and time.monotonic() - t0 >= 1.5, "it waited for the database instead of failing"
        with ctx.sessions() as session:
            assert set(session.scalars(select(Image.status).where(Image.id.in_(ids)))) == {"done"}
        ctx.sessions.kw["bind"].dispose()


def test_an_emptied_redis_queue_reads_as_empty_not_unknown(tmp_path, private_redis):
    settings = Settings.from_env({"BONEDETECT_HOME": str(tmp_path), "BROKER_URL": private_redis.url, "QUEUE_NAME": "q"})
    app = make_celery(settings)
    enqueue_chunks(app, ["a", "b", "c"], 1)
    assert broker_queue_length(app, "q") == 3
    private_redis.flush()  # Redis drops an emptied list: "no such queue" means nothing waits
    assert broker_queue_length(app, "q") == 0
    private_redis.stop()
    assert broker_queue_length(app, "q") is None, "a broker that does not answer cannot say"


def test_the_reconciler_gives_the_embedded_brokers_connections_back(tmp_path):
    """It asks the broker every round; with the garbage collector idle, the 16th round used to wait 30 s."""
    import gc

    import kombu.transport.sqlalchemy as kombu_sqla

    broker = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    settings = Settings.from_env({"BONEDETECT_HOME": str(tmp_path), "BROKER_URL": broker, "QUEUE_NAME": "q"})
    app = make_celery(settings)
    enqueue_chunks(app, ["a", "b", "c"], 1)
    gc.disable()
    try:
        for round_ in range(20):
            assert broker_queue_length(app, "q") == 3
            engine, _ = kombu_sqla.Channel._engines[broker.split("+", 1)[1]]
            assert engine.pool.checkedout() == 0, f"round {round_}: {engine.pool.status()}"
    finally:
        gc.enable()
