"""Reading a job submission: multipart fields, file names, file types.

A batch is never whole in memory. With a local blob store each file part
past 500 KB is written, as werkzeug parses it, straight into the store's
folder as an unnamed file, and storing it is a hard link (UploadRequest,
LocalBlobStore.staging_file): a radiograph's bytes are written once.
Otherwise werkzeug spools each part past 500 KB to a temporary file, which
is then copied to the blob store in 1 MiB chunks; smaller parts stay in
memory either way.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import unicodedata
from dataclasses import dataclass
from typing import BinaryIO

from flask import Request, current_app
from werkzeug.datastructures import FileStorage

from api.errors import ApiError
from bonedetect.formats import CONTENT_TYPES, HEAD_BYTES, UNSUPPORTED, sniff_format
from bonedetect.settings import Settings

log = logging.getLogger(__name__)

FIELD = "files"
MAX_FILENAME = 300  # Image.filename
MAX_TEXT = 200  # Image.external_id, Job.label, Job.idempotency_key
CHUNK = 1024 * 1024


BODY_BUFFER = 1024 * 1024


class _BoundedBody(io.RawIOBase):
    """A request body as a raw stream that never reads past its Content-Length."""

    def __init__(self, stream: BinaryIO, length: int):
        self.stream, self.left = stream, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left <= 0:
            return 0
        data = self.stream.read(min(len(buffer), self.left))
        n = len(data)
        buffer[:n] = data
        self.left -= n
        return n


def buffered_body(wsgi_app, buffer_size: int = BODY_BUFFER):
    """WSGI middleware: a large request body is read from the server 1 MiB at a time, and handed to
    werkzeug's multipart parser (which reads 64 KiB at a time) from this buffer.

    Why: gunicorn 27 reads ahead up to 1 MiB from the socket for a body of known length, but each
    64 KiB read then copies what it holds ahead (`Unreader.read`: getvalue, slice, write back), so a
    1 MiB read-ahead is copied ~16 times over; those copies were 31% of the API's samples in a profile
    of uploads (py-spy), and one
    upload ran at half the rate of the same API under Flask's own server (docs/benchmarks.md).
    Chunked bodies are left as the server gives them."""

    def app(environ, start_response):
        length = environ.get("CONTENT_LENGTH") or ""
        chunked = "HTTP_TRANSFER_ENCODING" in environ  # the server de-chunks it: Content-Length is not its end
        if not chunked and length.isascii() and length.isdigit() and int(length) > buffer_size:
            environ["wsgi.input"] = io.BufferedReader(_BoundedBody(environ["wsgi.input"], int(length)), buffer_size)
        return wsgi_app(environ, start_response)

    return app


class UploadRequest(Request):
    """Flask's request, with each file part written where the blob store can
    take it without a copy (the app's request_class)."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        stage = getattr(current_app.extensions["bonedetect"].blobs, "staging_file", None)
        staged = stage() if stage is not None else None
        if staged is not None:
            return staged
        return super()._get_file_stream(total_content_length, content_type, filename, content_length)


def raise_open_file_limit(settings: Settings, requests_at_once: int = 4) -> int:  # 4: compose's gunicorn --threads
    """Lift this process's soft limit on open files toward its hard limit, so
    that `requests_at_once` submissions of MAX_FILES_PER_JOB files past 500 KB
    (each holds a handle until its request ends) fit; returns the limit.
    Containers often start with a soft limit of 1,024 under a hard one of
    half a million: a 1,000-radiograph job failed there with EMFILE."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to lift
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = requests_at_once * settings.max_files_per_job + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as err:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, err)
    if soft != resource.RLIM_INFINITY and soft < settings.max_files_per_job + 256:  # one job, and room beside it
        log.warning("open-file limit %d is below MAX_FILES_PER_JOB=%d: a job of that many radiographs will fail "
                    "(raise the API's nofile limit, or lower MAX_FILES_PER_JOB)", soft, settings.max_files_per_job)
    return soft


@dataclass
class Submission:
    files: list[FileStorage]
    external_ids: list[str | None]  # one per file
    label: str | None
    open: bool = False  # the job takes more files (POST /v1/jobs/<id>/images) until it is closed
    part: bool = False  # a part of an open job

    @property
    def limit_scope(self) -> str:
        """What MAX_FILES_PER_JOB limits for this submission: a job sent whole, or one request of a job in parts."""
        return "request" if self.open or self.part else "job"


def sniff(stream: BinaryIO) -> tuple[str | None, str | None]:
    """(content type, None) for PNG, JPEG and DICOM, else (None, reason); the stream is rewound."""
    head = stream.read(HEAD_BYTES)
    stream.seek(0)
    if not head:
        return None, "empty file"
    kind = sniff_format(head)
    return (CONTENT_TYPES[kind], None) if kind else (None, UNSUPPORTED)


def stream_size(stream: BinaryIO) -> int:
    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    return size


def sanitize_filename(name: str | None) -> str | None:
    """The base name only, without control characters, at most 300 characters."""
    if not name:
        return None
    name = unicodedata.normalize("NFC", name).replace("\\", "/")
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf"))
    name = posixpath.basename(name).strip()
    if name in ("", ".", ".."):
        return None
    if len(name) > MAX_FILENAME:
        stem, ext = posixpath.splitext(name)
        ext = ext if len(ext) <= 16 else ""
        name = stem[: MAX_FILENAME - len(ext)] + ext
    return name


def _text(value: str | None, what: str) -> str | None:
    value = (value or "").strip()
    if len(value) > MAX_TEXT:
        raise ApiError(400, f"{what} is longer than {MAX_TEXT} characters")
    return value or None


def idempotency_key(request: Request) -> str | None:
    return _text(request.headers.get("Idempotency-Key"), "Idempotency-Key")


def submission_digest(sub: Submission, callback_url: str | None) -> str:
    """SHA-256 over everything a submission asks for: label, callback URL, and
    each file's name, external id and bytes, in order (the streams are
    rewound). Two requests with one Idempotency-Key must agree on it."""
    digest = hashlib.sha256()

    def field(value: str | None) -> None:
        data = b"\x00" if value is None else b"\x01" + value.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big") + data)  # length-prefixed: no two field lists collide

    field(sub.label)
    field(callback_url)
    if sub.open:  # after the fields every submission has, so the fingerprints of whole jobs are as before
        field("open")
    for f, external_id in zip(sub.files, sub.external_ids):
        field(f.filename)
        field(external_id)
        digest.update(stream_size(f.stream).to_bytes(8, "big"))
        while chunk := f.stream.read(CHUNK):
            digest.update(chunk)
        f.stream.seek(0)
    return digest.hexdigest()


def discard_body(request: Request) -> None:
    """Read the unneeded upload to its end, so the client gets to read our answer."""
    while request.stream.read(CHUNK):
        pass


def flag(value: str | None, what: str) -> bool:
    """A true/false field or query argument (true, 1, false, 0; absent: false); else 400."""
    raw = "false" if value is None else value.lower()
    if raw not in ("true", "1", "false", "0"):
        raise ApiError(400, f"{what} must be true or false")
    return raw in ("true", "1")


JOB_FIELDS = ("label", "callback_url", "open")  # a job's own fields: sent when it is made, not with a part


def parse_submission(request: Request, settings: Settings, part: bool = False) -> Submission:
    """Validate the request's shape and limits; raises ApiError (400/413/415).

    A job's submission (POST /v1/jobs) may set `open=true`, and then needs no files yet; a part of an
    open job (`part`: POST /v1/jobs/<id>/images) carries files and their external ids only."""
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, f"send multipart/form-data with the images under the field '{FIELD}'")
    if part and (sent := [k for k in JOB_FIELDS if k in request.form]):
        raise ApiError(400, f"{', '.join(sent)}: set when the job is opened (POST /v1/jobs), not with a part")
    opening = False if part else flag(request.form.get("open"), "open")
    # A form whose file input was left empty sends a part without a name or bytes.
    files = [f for f in request.files.getlist(FIELD) if f.filename or stream_size(f.stream)]
    if not files and not opening:
        other = sorted(k for k in request.files if k != FIELD)
        hint = f" (got file fields {other})" if other else ""
        raise ApiError(400, f"no files: send the images under the multipart field '{FIELD}'{hint}")
    if len(files) > settings.max_files_per_job:
        per = "request" if part or opening else "job"
        raise ApiError(400, f"{len(files)} files is above the limit of {settings.max_files_per_job} per {per}")
    from api.archives import is_zip_stream  # a zip's members are checked one by one (api/archives.py)

    for f in files:
        if stream_size(f.stream) > settings.max_file_bytes and not is_zip_stream(f.stream):
            name = sanitize_filename(f.filename) or "(unnamed)"
            raise ApiError(413, f"file {name!r} is larger than the limit of {settings.max_file_bytes} bytes")

    raw_ids = request.form.getlist("external_id")
    if "external_ids" in request.form:
        if raw_ids:
            raise ApiError(400, "send either repeated 'external_id' fields or one 'external_ids' JSON list, not both")
        try:
            raw_ids = json.loads(request.form["external_ids"])
        except ValueError:
            raise ApiError(400, "'external_ids' must be a JSON list of strings") from None
        if not isinstance(raw_ids, list) or not all(isinstance(v, (str, int)) or v is None for v in raw_ids):
            raise ApiError(400, "'external_ids' must be a JSON list of strings")
    if raw_ids and len(raw_ids) != len(files):
        raise ApiError(400, f"got {len(raw_ids)} external ids for {len(files)} files: send one per file, in order")
    external_ids = [_text(None if v is None else str(v), f"external id #{i + 1}") for i, v in enumerate(raw_ids)]
    return Submission(files, external_ids or [None] * len(files), _text(request.form.get("label"), "label"), opening, part)
