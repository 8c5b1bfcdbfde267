"""The Bone Detect HTTP API: a thin Flask app that stores uploads, writes rows
and sends Celery tasks by name. It never imports torch, worker/ or model/.

    app = create_app()                       # settings from the environment
    app = create_app(settings, enqueue=fn)   # tests: fn(image_ids) replaces the broker
    gunicorn "api:create_app()"
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from flask import Flask, current_app, g
from sqlalchemy.orm import Session

from api.errors import register_error_handlers
from bonedetect.queue import enqueue_chunks, make_celery
from bonedetect.settings import Settings
from db.blobstore import open_blob_store
from db.session import make_engine, make_sessionmaker

Enqueue = Callable[[list[str]], object]  # called with the ids of committed, queued images


class Services:
    """What the request handlers share: app.extensions["bonedetect"]."""

    def __init__(self, settings: Settings, enqueue: Enqueue | None = None):
        self.settings = settings
        engine_args = {"connect_args": {"connect_timeout": 10}} if settings.database_url.startswith("postgres") else {}
        self.engine = make_engine(settings.database_url, **engine_args)
        self.sessionmaker = make_sessionmaker(self.engine)
        self.blobs = open_blob_store(settings.blob_url)
        self._enqueue = enqueue
        self._celery = None
        self._lock = threading.Lock()

    @property
    def celery(self):
        """The Celery app, made on first use, so the API starts without a broker."""
        with self._lock:
            if self._celery is None:
                self._celery = make_celery(self.settings)
            return self._celery

    def enqueue(self, image_ids: list[str]) -> None:
        if self._enqueue is not None:
            self._enqueue(image_ids)
        else:
            enqueue_chunks(self.celery, image_ids, self.settings.chunk_size)


def services() -> Services:
    return current_app.extensions["bonedetect"]


def db_session() -> Session:
    """The request's session, opened on first use and closed at teardown."""
    if "db" not in g:
        g.db = services().sessionmaker()
    return g.db


def index():
    return {
        "service": "bonedetect",
        "auth": "Authorization: Bearer <key> on every /v1 call",
        "endpoints": {
            "POST /v1/jobs": "submit radiographs: multipart 'files' (PNG/JPEG/DICOM, zip), 'external_id' per file, "
                             "'label', 'callback_url'; open=true: a job sent in parts",
            "POST /v1/jobs/<job_id>/images": "a part of a job opened with open=true: its 'files', queued at once",
            "POST /v1/jobs/<job_id>/close": "no more parts: the job finishes when its images have",
            "GET /v1/jobs": "this tenant's jobs, newest first (?limit=&cursor=)",
            "GET /v1/jobs/<job_id>": "status, counts and progress",
            "DELETE /v1/jobs/<job_id>": "cancel the images not yet processed",
            "GET /v1/jobs/<job_id>/images": "per-image status and statistics (?limit=&cursor=&status=)",
            "GET /v1/jobs/<job_id>/results.csv": "the same as CSV",
            "GET /v1/images/<image_id>": "one image",
            "GET /v1/images/<image_id>/mask.png": "tumor mask at the original size",
            "GET /v1/images/<image_id>/overlay.png": "radiograph with the tumor outlined",
            "GET /v1/images/<image_id>/seg.dcm": "DICOM SEG of the mask, for images uploaded as DICOM",
            "GET /v1/images/<image_id>/source": "the file as uploaded",
            "GET /": "the web page",
            "GET /healthz": "liveness",
            "GET /readyz": "readiness (database and broker reachable, a worker with a loaded model alive)",
            "GET /metrics": "Prometheus metrics",
        },
    }


def create_app(settings: Settings | None = None, *, enqueue: Enqueue | None = None) -> Flask:
    from api import health, images, jobs, metrics, web
    from api.uploads import UploadRequest, buffered_body, raise_open_file_limit
    from bonedetect.logs import configure_logging, init_request_logging

    settings = settings or Settings.from_env()
    settings.ensure_home()
    configure_logging(settings.log_level, settings.log_format)
    raise_open_file_limit(settings)  # every file past 500 KB of a request in flight holds a handle
    app = Flask(__name__)
    app.request_class = UploadRequest  # file parts written straight into a local blob store's folder
    app.wsgi_app = buffered_body(app.wsgi_app)  # large bodies read from the server 1 MiB at a time
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        # one part per file, one per external_id, a few more for label and friends
        MAX_FORM_PARTS=2 * settings.max_files_per_job + 16,
    )
    app.json.sort_keys = False
    app.extensions["bonedetect"] = Services(settings, enqueue)

    @app.teardown_appcontext
    def close_session(_exc):
        session = g.pop("db", None)
        if session is not None:
            session.close()

    @app.after_request
    def no_sniff(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    register_error_handlers(app)
    init_request_logging(app)
    app.add_url_rule("/v1", "index", index)
    app.register_blueprint(web.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(images.bp)
    return app
