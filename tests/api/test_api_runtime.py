"""How the API process runs: without torch, and without a database."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

from api import create_app
from bonedetect.settings import Settings
from tests.api.conftest import png_bytes

SCRIPT = textwrap.dedent(
    """
    import sys
    import api
    from bonedetect.client import encode_multipart
    from bonedetect.settings import Settings
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker
    from db.tenants import create_tenant

    home = sys.argv[1]
    settings = Settings.from_env({"BONEDETECT_HOME": home})   # the embedded default, broker included
    settings.ensure_home()
    upgrade(settings.database_url)
    with make_sessionmaker(make_engine(settings.database_url)).begin() as session:
        key = create_tenant(session, "h")[1]
    app = api.create_app(settings)
    body, ctype = encode_multipart([], [("files", "a.png", open(sys.argv[2], "rb").read())])
    client = app.test_client()
    resp = client.post("/v1/jobs", data=body, headers={"Authorization": "Bearer " + key, "Content-Type": ctype})
    assert resp.status_code == 202, resp.json
    assert client.get(resp.json["status_url"], headers={"Authorization": "Bearer " + key}).status_code == 200
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "worker", "model", "training"))
    assert not heavy, heavy
    print("ok")
    """
)


def test_api_never_imports_torch_worker_or_model(tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(png_bytes())
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "var"), str(png)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_unreachable_database_answers_503_json(tmp_path):
    settings = Settings.from_env(
        {
            "BONEDETECT_HOME": str(tmp_path),
            "DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/bonedetect",
            "BROKER_URL": "redis://127.0.0.1:1/0",
        }
    )
    app = create_app(settings, enqueue=lambda ids: None)  # starts: nothing is contacted yet
    client = app.test_client()
    auth = {"Authorization": "Bearer bd_some-key"}
    for resp in (
        client.get("/v1/jobs", headers=auth),
        client.get("/v1/jobs/6f1c1f5e-0000-4000-8000-000000000000", headers=auth),
        client.post("/v1/jobs", data={"files": [(io.BytesIO(png_bytes()), "a.png")]}, headers=auth),
    ):
        assert resp.status_code == 503
        assert resp.json == {"error": "database unavailable, retry later"}
        assert int(resp.headers["Retry-After"]) > 0
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json["status"] == "unavailable"
    assert client.get("/healthz").status_code == 200, "the process itself is alive"


def test_file_blob_url_forms(tmp_path, monkeypatch):
    """BLOB_URL=file:///abs and file://relative both land where they say (db.blobstore fix)."""
    from db.blobstore import open_blob_store

    monkeypatch.chdir(tmp_path)
    assert open_blob_store(f"file://{tmp_path}/abs").root == tmp_path / "abs"
    assert open_blob_store("file://var/blobs").root == tmp_path / "var" / "blobs"
    assert open_blob_store("file://./rel").root == tmp_path / "rel"
