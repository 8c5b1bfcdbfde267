"""The bad-input corpus (tests/corpus/) through the real HTTP API and a real
worker: every bad file fails alone with a clear reason, every malformed
request gets a 4xx JSON error, and the rest of the batch finishes."""

from __future__ import annotations

import http.client
import io
import json
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from bench.services import start_system
from tests.corpus.make_corpus import build, build_request, load_manifest

pytestmark = pytest.mark.integration


def post_raw(api_url: str, key: str, body: bytes, content_type: str) -> tuple[int, dict | None]:
    """POST /v1/jobs as any HTTP client would; the server may answer (413) before
    it has read the whole body, so a send cut short still reads the answer."""
    url = urlparse(api_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest("POST", "/v1/jobs")
        conn.putheader("Authorization", f"Bearer {key}")
        conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        try:
            for start in range(0, len(body), 1 << 20):
                conn.send(body[start : start + (1 << 20)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: its answer is waiting
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, (json.loads(raw) if ctype.startswith("application/json") else None)
    finally:
        conn.close()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 1.0 if a.sum() + b.sum() == 0 else 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture
def system(tmp_path, pg_url, private_redis):
    limits = {k: str(v) for k, v in load_manifest()["limits"].items()}
    system = start_system(tmp_path / "system", pg_url, private_redis.url, workers=1, env=limits)
    yield system
    system.stop()


def test_every_corpus_file_gets_its_outcome_and_the_batch_finishes(system, tmp_path):
    corpus = build(tmp_path / "corpus")
    client = system.client()
    files = [(e["upload_name"], e["path"].read_bytes()) for e in corpus]
    answer = client.submit(files, label="bad-input corpus")

    # Files the API can judge from their first bytes are refused in its answer, with the reason.
    refused_at_upload = {r["position"]: r["error"] for r in answer["rejected"]}
    for position, e in enumerate(corpus):
        if e["expect"].get("at") == "upload":
            assert e["expect"]["error"] in refused_at_upload.pop(position), e["file"]
    assert refused_at_upload == {}, "nothing else is refused at upload"
    assert answer["image_count"] == len(corpus)

    final = client.wait(answer["job_id"], timeout=180, poll=0.25)
    assert final["status"] == "done_with_errors"
    images = list(client.images(answer["job_id"]))
    assert [im["position"] for im in images] == list(range(len(corpus))), "one row per file, in order"

    for e, im in zip(corpus, images, strict=True):
        expect = e["expect"]
        assert im["status"] == expect["status"], (e["file"], im["error"])
        if expect["status"] == "failed":
            assert expect["error"] in im["error"], (e["file"], im["error"])
            assert im["mask_url"] is None
            continue
        assert im["error"] is None and im["mask_url"], e["file"]
        for field in ("width", "height", "filename"):
            if field in expect:
                assert im[field] == expect[field], (e["file"], field, im[field])
        if "filename_length" in expect:
            assert len(im["filename"]) == expect["filename_length"] and im["filename"].endswith(
                expect["filename_suffix"]
            )
        mask = np.asarray(Image.open(io.BytesIO(client.mask_png(im["image_id"]))))
        assert mask.shape == (im["height"], im["width"]), f"{e['file']}: the mask is at the displayed size"
        assert int((mask > 0).sum()) == im["area_px"]
        if expect.get("lesion_in_display_frame"):
            truth = np.asarray(Image.open(e["truth_path"]))
            assert truth.shape == mask.shape
            assert dice(mask, truth) > 0.3, "the lesion is found where the radiologist sees it"
            assert im["tumor_detected"] and im["bbox_x"] + im["bbox_w"] <= im["width"]
            ys, xs = np.nonzero(truth)
            assert abs(im["centroid_x"] - xs.mean()) < 0.1 * im["width"]
            assert abs(im["centroid_y"] - ys.mean()) < 0.1 * im["height"]

    csv_text = client.results_csv(answer["job_id"])
    assert len(csv_text.strip().splitlines()) == len(corpus) + 1, "the CSV has every file, failed ones too"


def test_malformed_requests_get_a_4xx_json_error_and_create_nothing(system):
    manifest = load_manifest()
    key = system.keys["a"]
    for case in manifest["requests"]:
        body, ctype = build_request(case["send"], manifest["limits"])
        status, answer = post_raw(system.api_url, key, body, ctype)
        assert status == case["expect"]["status"], (case["name"], status, answer)
        assert answer is not None and case["expect"]["error"] in answer["error"], (case["name"], answer)
    assert system.client().get_json("/v1/jobs")["jobs"] == [], "no refused request left a job"
    assert not list(system.blob_root.glob("tenants/*/jobs/*")), "nor any file"
