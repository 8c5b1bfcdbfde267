"""Structured logs: one JSON object per line, carrying job and image ids.

Every process (API, worker, reconciler) calls `configure_logging(settings)`
once; each record then leaves as a line such as

    {"ts": "2026-11-27T08:01:02.345Z", "level": "INFO", "logger": "bonedetect.worker",
     "msg": "image done", "job_id": "9c0...", "image_id": "4f1...", "processing_ms": 812.4}

so a log pipeline (Loki, Elasticsearch, CloudWatch) can follow one image from
its upload (API) to its result (worker) by `job_id` and `image_id`.

Ids reach a record in two ways:

- `extra=`: ``log.info("image done", extra={"job_id": ..., "image_id": ...})``;
- a context: ``with log_context(job_id=...):`` (or `bind`/`unbind` in
  signal handlers) adds its fields to every record logged inside it, also by
  code that knows nothing about ids (Celery's own lines, worker/tasks.py).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

# Fields every record has; anything else a record carries (extra=, context) is added after them.
_BASE = ("ts", "level", "logger", "msg")
# Attributes of every LogRecord: not "extra" fields.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

_context: contextvars.ContextVar[dict] = contextvars.ContextVar("bonedetect_log_context", default={})


def bind(**fields) -> contextvars.Token:
    """Add fields to every record logged from this context on; returns a token for `unbind`."""
    return _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def unbind(token: contextvars.Token) -> None:
    _context.reset(token)


@contextmanager
def log_context(**fields) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def current_context() -> dict:
    return dict(_context.get())


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the context's and the record's extra fields,
    and `exc` (the formatted traceback) when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc)
        out = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in current_context().items():
            out.setdefault(key, _jsonable(value))
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in _BASE and not key.startswith("_"):
                out[key] = _jsonable(value)
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, ensure_ascii=False, default=str)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (never a stream replaced since)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


_MARK = "_bonedetect_handler"


def configure_logging(level: str | int = "INFO", fmt: str = "json", stream=None) -> logging.Handler:
    """Install the one Bone Detect handler on the root logger (idempotent: a second
    call replaces the first's handler, other handlers are left alone).

    fmt "json": JsonFormatter; "text": a plain human line (for a terminal).
    stream None: sys.stderr at the time of each record.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"LOG_FORMAT must be 'json' or 'text', got {fmt!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
    handler = StderrHandler() if stream is None else logging.StreamHandler(stream)
    setattr(handler, _MARK, True)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # The API logs each request itself (with its job and image ids): werkzeug's own line would repeat it.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return handler


# -- the API's request log -------------------------------------------------------

_QUIET_PATHS = ("/healthz", "/readyz", "/metrics", "/static/")


def init_request_logging(app) -> None:
    """Log one line per request of a Flask app, with the job and image ids it touched.

    Probes, scrapes and successful GETs (polls, downloads) log at DEBUG, the rest at INFO.
    Ids come from the route (``/v1/jobs/<job_id>``, ``/v1/images/<image_id>``)
    and, for a submission, from the answer (its new ``job_id``); they are bound
    for the whole request, so any other line logged while serving it carries
    them too. The request id (``X-Request-ID``, made up when absent) is echoed.
    """
    import time
    import uuid

    from flask import g, request

    log = logging.getLogger("bonedetect.api")

    @app.before_request
    def _start():
        g._log_t0 = time.perf_counter()
        g._log_request_id = (request.headers.get("X-Request-ID") or "").strip()[:100] or uuid.uuid4().hex
        args = request.view_args or {}
        g._log_token = bind(
            request_id=g._log_request_id, job_id=args.get("job_id"), image_id=args.get("image_id")
        )

    @app.after_request
    def _log(response):
        t0 = g.pop("_log_t0", None)
        if t0 is None:
            return response
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round(1000 * (time.perf_counter() - t0), 2),
        }
        if tenant := g.get("tenant_id"):
            fields["tenant_id"] = tenant
        if request.method == "POST" and response.is_json and not response.direct_passthrough:
            body = response.get_json(silent=True) or {}
            for key in ("job_id", "image_count", "accepted"):
                if key in body:
                    fields[key] = body[key]
        # Probes and scrapes, and polls and downloads that succeed, are DEBUG; submissions, cancels and errors INFO.
        quiet = request.path.startswith(_QUIET_PATHS) or (request.method in ("GET", "HEAD") and response.status_code < 400)
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s %s %s", request.method, request.path, response.status_code, extra=fields,
        )
        response.headers.setdefault("X-Request-ID", g.get("_log_request_id", ""))
        return response

    @app.teardown_request
    def _unbind(_exc):
        token = g.pop("_log_token", None)
        if token is not None:
            try:
                unbind(token)
            except ValueError:  # created in another context (should not happen): leave it
                pass
