"""The API on a real, migrated database (a temp SQLite file; PostgreSQL for the
integration cases) and a temp blob store. Only the broker is replaced: an
injected `enqueue` records each chunk task as make_celery's app would send it."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select, update

from api import create_app
from bonedetect.client import encode_multipart
from bonedetect.queue import SEGMENT_TASK, enqueue_chunks
from bonedetect.settings import Settings
from db.blobstore import LocalBlobStore
from db.migrate import upgrade
from db.models import Image, Job
from db.session import make_engine, make_sessionmaker
from db.tenants import create_tenant
from tests.integration.conftest import pg_url  # noqa: F401  (a fresh PostgreSQL database per test)



def png_bytes(w: int = 40, h: int = 30, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(w: int = 40, h: int = 30, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


class RecordingBroker:
    """Stands in for the Celery app: records send_task calls, and checks that
    every image id it is handed already has a committed row."""

    def __init__(self, sessions, chunk_size: int):
        self.sessions, self.chunk_size = sessions, chunk_size
        self.tasks: list[tuple[str, list[str]]] = []
        self.uncommitted: list[str] = []
        self.fail = False

    def __call__(self, image_ids: list[str]) -> None:  # the `enqueue` given to create_app
        if self.fail:
            raise ConnectionError("broker down")
        with self.sessions() as session:  # another connection: sees only committed rows
            found = set(session.scalars(select(Image.id).where(Image.id.in_(image_ids), Image.status == "queued")))
        self.uncommitted += [i for i in image_ids if i not in found]
        enqueue_chunks(self, image_ids, self.chunk_size)

    def send_task(self, name: str, args: list) -> None:
        self.tasks.append((name, args[0]))

    @property
    def chunks(self) -> list[list[str]]:
        assert all(name == SEGMENT_TASK for name, _ in self.tasks)
        return [ids for _, ids in self.tasks]


@dataclass
class Api:
    app: object
    client: object
    settings: Settings
    sessions: object
    blobs: LocalBlobStore
    broker: RecordingBroker
    keys: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        self.app.extensions["bonedetect"].engine.dispose()
        self.sessions.kw["bind"].dispose()

    def auth(self, tenant: str = "a") -> dict:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def submit(self, files, tenant="a", fields=(), headers=None):
        """POST /v1/jobs with the body the real client (bonedetect.client) sends."""
        body, ctype = encode_multipart(list(fields), [("files", name, data) for name, data in files])
        return self.client.post(
            "/v1/jobs", data=body, headers={**self.auth(tenant), "Content-Type": ctype, **(headers or {})}
        )

    def get(self, path, tenant="a", **kw):
        return self.client.get(path, headers=self.auth(tenant), **kw)

    def rows(self, job_id: str) -> list[Image]:
        with self.sessions() as session:
            return list(session.scalars(select(Image).where(Image.job_id == job_id).order_by(Image.position)))

    def job_row(self, job_id: str) -> Job | None:
        with self.sessions() as session:
            return session.get(Job, job_id)

    def set_images(self, image_ids, **values) -> None:
        """Play the worker: write status/statistics straight into the rows."""
        with self.sessions.begin() as session:
            session.execute(update(Image).where(Image.id.in_(list(image_ids))).values(**values))


def build_api(tmp_path: Path, database_url: str, **env) -> Api:
    settings = Settings.from_env(
        {
            "BONEDETECT_HOME": str(tmp_path / "var"),
            "DATABASE_URL": database_url,
            "BLOB_URL": f"file://{tmp_path / 'blobs'}",
            "BROKER_URL": "redis://127.0.0.1:1/0",  # never used: enqueue is injected
            "CHUNK_SIZE": "2",
            **env,
        }
    )
    upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with sessions.begin() as session:
        keys = {name: create_tenant(session, f"hospital-{name}")[1] for name in ("a", "b")}
    broker = RecordingBroker(sessions, settings.chunk_size)
    app = create_app(settings, enqueue=broker)
    return Api(app, app.test_client(), settings, sessions, LocalBlobStore(tmp_path / "blobs"), broker, keys)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bd.sqlite'}"


@pytest.fixture
def api(tmp_path, sqlite_url) -> Api:
    built = build_api(tmp_path, sqlite_url)
    yield built
    built.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def any_db_api(request, tmp_path) -> Api:
    """The same test on SQLite (embedded mode) and on the machine's PostgreSQL."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    built = build_api(tmp_path, url)
    yield built
    built.close()
