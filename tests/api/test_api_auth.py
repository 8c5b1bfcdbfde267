"""API keys, and the JSON shape of every error."""

from __future__ import annotations

import pytest

from db.tenants import revoke_key

V1_PATHS = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000"),
    ("DELETE", "/v1/jobs/00000000-0000-0000-0000-000000000000"),
    ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000/images"),
    ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000/results.csv"),
    ("GET", "/v1/images/00000000-0000-0000-0000-000000000000"),
    ("GET", "/v1/images/00000000-0000-0000-0000-000000000000/mask.png"),
]


@pytest.mark.parametrize("method,path", V1_PATHS)
def test_v1_without_key_is_401_json(api, method, path):
    resp = api.client.open(path, method=method)
    assert resp.status_code == 401
    assert resp.json == {"error": "missing API key: send the header 'Authorization: Bearer <key>'"}
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Bearer bd_not-a-key", "Basic dXNlcjpwYXNz", "Bearer ", "bd_key-without-scheme"])
def test_bad_key_is_401_json(api, header):
    resp = api.client.get("/v1/jobs", headers={"Authorization": header})
    assert resp.status_code == 401
    assert resp.is_json and resp.json["error"]


def test_revoked_key_is_401(api):
    assert api.get("/v1/jobs").status_code == 200
    with api.sessions.begin() as session:
        assert revoke_key(session, api.keys["a"][:10]) == 1
    resp = api.get("/v1/jobs")
    assert resp.status_code == 401
    assert resp.json == {"error": "invalid or revoked API key"}
    assert api.get("/v1/jobs", tenant="b").status_code == 200, "other tenants' keys still work"


def test_bearer_scheme_is_case_insensitive(api):
    resp = api.client.get("/v1/jobs", headers={"Authorization": f"bearer {api.keys['a']}"})
    assert resp.status_code == 200


def test_health_and_index_need_no_key(api):
    assert api.client.get("/healthz").json == {"status": "ok"}
    ready = api.client.get("/readyz")  # answered without a key; not ready here: no broker, no worker (tests/ops)
    assert ready.status_code == 503 and ready.json["checks"]["database"] == {"ok": True}
    index = api.client.get("/v1")
    assert index.status_code == 200 and "POST /v1/jobs" in index.json["endpoints"]


def test_unknown_route_and_wrong_method_answer_json(api):
    missing = api.client.get("/nope")
    assert missing.status_code == 404 and missing.json == {"error": "not found"}
    wrong = api.client.put("/v1/jobs", headers=api.auth())
    assert wrong.status_code == 405 and wrong.is_json and wrong.json["error"]
    assert set(wrong.headers["Allow"].split(", ")) >= {"GET", "POST"}


def test_unexpected_error_is_json_500_without_traceback(api, monkeypatch):
    from api import jobs as api_jobs

    def boom(*_):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api_jobs, "job_progress", boom)
    job_id = api.submit([("a.png", b"\x89PNG\r\n\x1a\n...")]).json["job_id"]
    resp = api.get(f"/v1/jobs/{job_id}")
    assert resp.status_code == 500
    assert resp.json == {"error": "internal server error"}
