"""The fault scenarios (bench/chaos.py) against real services and real worker
processes: nothing is lost, nothing is written twice."""

from __future__ import annotations

import pytest

from bench import chaos

pytestmark = pytest.mark.integration


def assert_complete(result: chaos.Result, images: int) -> None:
    """Every image `done` exactly once: no loss, no duplicate row, mask or statistics."""
    assert result.problems == []
    assert (result.submitted, result.done, result.failed) == (images, images, 0)
    assert (result.lost, result.duplicates) == (0, 0)
    assert result.observed["unfinished"] == 0, "nothing left queued or processing"


@pytest.mark.parametrize("concurrency", [1, 2], ids=["one-chunk-at-a-time", "two-chunks-at-once"])
def test_killed_worker_loses_no_image_and_writes_each_once(chaos_env, concurrency):
    result = chaos.worker_killed(chaos_env, images=24, concurrency=concurrency)

    # CHUNK_SIZE=4: more than one worker's chunks in hand means both workers held one
    assert result.observed["processing_at_kill"] > 4 * concurrency, "the killed worker held a chunk when it died"
    assert result.observed["rerun"] >= 1, "its images were claimed again once their lease ran out"
    assert result.observed["status"] == "done"
    assert_complete(result, 24)


def test_broker_restarted_empty_mid_batch_is_refilled_by_the_reconciler(chaos_env):
    # (python -m bench.chaos also runs the FLUSHALL variant, "redis-flushed")
    result = chaos.redis_lost(chaos_env, images=32, how="restart")

    assert result.observed["waiting_before"] > 0, "chunks were waiting in Redis when it lost them"
    assert result.observed["waiting_after"] == 0
    assert result.observed["unfinished_at_fault"] > 0
    assert result.observed["status"] == "done"
    assert_complete(result, 32)


def test_postgres_restart_mid_batch_completes_and_the_api_answers_503_json(chaos_env, private_postgres_available):
    result = chaos.postgres_restarted(chaos_env, images=24, down_s=3.0)

    answers = result.observed["outage_answers"]
    assert {a["request"] for a in answers} >= {"GET /v1/jobs/<job>", "POST /v1/jobs", "GET /readyz"}
    for a in answers:
        assert a["status"] == 503, a
        assert a["json"] is not None and "database unavailable" in a["json"]["error"], "a JSON error, not a stack trace"
        assert a["retry_after"], "Retry-After tells the client when to come back"
    retries = result.observed["worker_retries"]
    assert retries["claim"] + retries["write results"] > 0, "the worker met the outage and retried"
    assert result.observed["status"] == "done"
    assert result.observed["jobs"] == 1
    assert_complete(result, 24)


def test_api_killed_mid_upload_leaves_no_partial_job(chaos_env):
    result = chaos.api_killed_mid_upload(chaos_env, images=8)
    seen = result.observed

    assert seen["upload_bytes"] > 4_000_000, "a large upload"
    assert seen["mid_body"] == {"incomplete_jobs": [], "job_folders": 0}
    assert seen["mid_store"]["incomplete_jobs"] == [], "no job visible with missing files"
    if seen["mid_store"]["committed_jobs"] == 0:  # killed before the commit, as intended
        assert seen["mid_store"]["orphan_folders"] == 1 and seen["orphans_purged"] == 1
        assert seen["retry_status"] == 202, "the retry with the same Idempotency-Key made the job"
    else:  # the kill came after the commit: the job is whole, and the retry finds it
        assert seen["retry_status"] == 200
    assert seen["orphans_left"] == 0
    assert seen["jobs"] == 1 and seen["incomplete_jobs_at_end"] == []
    assert_complete(result, 8)


def test_same_idempotency_key_returns_the_same_job(chaos_env):
    result = chaos.idempotent_resubmit(chaos_env, images=6)
    seen = result.observed

    (first_status, first_job), (again_status, again_job) = seen["sequential"]
    assert (first_status, again_status) == (202, 200) and first_job == again_job
    statuses = [s for s, _ in seen["concurrent"]]
    assert sorted(statuses) == [200, 200, 200, 202], "four at once: one creates, three get it back"
    assert len({job for _, job in seen["concurrent"]}) == 1
    assert seen["jobs_listed"] == 2, "two keys, two jobs"
    assert_complete(result, 12)
