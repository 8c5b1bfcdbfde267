"""Structured logs: one JSON object per line, with the job and image ids."""

from __future__ import annotations

import io
import json
import logging

import pytest

from bonedetect.logs import JsonFormatter, configure_logging, log_context
from tests.api.conftest import png_bytes


@pytest.fixture
def lines():
    """Route the root logger through the Bone Detect handler into a buffer; parsed lines on call."""
    buffer = io.StringIO()
    configure_logging("DEBUG", "json", stream=buffer)
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    configure_logging("INFO", "json")


def test_a_record_is_one_json_line_with_context_and_extra_fields(lines):
    log = logging.getLogger("bonedetect.test")
    with log_context(job_id="j-1", image_ids=["i-1", "i-2"]):
        log.info("chunk %s of %d", "a", 2, extra={"image_id": "i-1", "processing_ms": 12.5})
    log.warning("outside")
    try:
        raise ValueError("bad pixels")
    except ValueError:
        log.exception("failed", extra={"image_id": "i-9"})
    first, second, third = lines()
    assert first["msg"] == "chunk a of 2" and first["level"] == "INFO" and first["logger"] == "bonedetect.test"
    assert (first["job_id"], first["image_ids"], first["image_id"], first["processing_ms"]) == ("j-1", ["i-1", "i-2"], "i-1", 12.5)
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert "job_id" not in second, "the context ends with its block"
    assert third["image_id"] == "i-9" and "ValueError: bad pixels" in third["exc"], "a traceback stays inside its line"


def test_configuring_twice_keeps_one_handler():
    root = logging.getLogger()
    before = len(root.handlers)
    configure_logging("INFO", "json")
    configure_logging("INFO", "text")
    configure_logging("INFO", "json")
    assert len(root.handlers) - before <= 1
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        configure_logging("INFO", "xml")
    assert isinstance(JsonFormatter(), logging.Formatter)


def test_api_logs_submission_and_polls_with_their_job_and_image_ids(api, lines):
    resp = api.submit([("a.png", png_bytes())], headers={"X-Request-ID": "req-42"})
    assert resp.status_code == 202 and resp.headers["X-Request-ID"] == "req-42"
    job_id = resp.json["job_id"]
    image_id = api.get(f"/v1/jobs/{job_id}/images").json["images"][0]["image_id"]
    api.get(f"/v1/jobs/{job_id}")
    api.get(f"/v1/images/{image_id}")
    api.get(f"/v1/images/{image_id}/mask.png")  # queued: 409
    api.client.get("/readyz")

    records = [r for r in lines() if r["logger"] == "bonedetect.api"]
    post = next(r for r in records if r["method"] == "POST")
    assert (post["job_id"], post["status"], post["request_id"], post["accepted"]) == (job_id, 202, "req-42", 1)
    assert post["level"] == "INFO" and post["tenant_id"]
    poll = next(r for r in records if r["path"] == f"/v1/jobs/{job_id}")
    assert poll["job_id"] == job_id and poll["level"] == "DEBUG", "polls are DEBUG: a client polls for hours"
    by_image = [r for r in records if r.get("image_id") == image_id]
    assert [r["status"] for r in by_image] == [200, 409]
    assert by_image[1]["level"] == "INFO", "errors are INFO"
    probe = next(r for r in records if r["path"] == "/readyz")
    assert probe["level"] == "DEBUG", "probes never flood the log, failing or not"
