"""The blob store: uploaded radiographs, masks and overlays.

Redis never holds pixels (claim check): tasks carry image ids, workers read
the bytes from here. `BLOB_URL=file:///path` is a local or shared folder
(a docker volume shared by API and workers).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

CHUNK = 1024 * 1024


class BlobNotFound(KeyError):
    pass


class BlobStore(Protocol):
    def put_stream(self, key: str, fileobj: BinaryIO, max_bytes: int | None = None) -> int: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> None: ...


class TooLarge(ValueError):
    pass


class LocalBlobStore:
    """Blobs as files under one root; every write is atomic (temp file + rename),
    so a reader never sees half a file and rewriting a key is idempotent."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"blob key escapes the store: {key!r}")
        return path

    def put_stream(self, key: str, fileobj: BinaryIO, max_bytes: int | None = None) -> int:
        """Copy a stream in 1 MiB chunks (never whole in memory); TooLarge past max_bytes."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := fileobj.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLarge(f"file is larger than the limit of {max_bytes} bytes")
                    out.write(chunk)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return size

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".write-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def open_blob_store(url: str) -> BlobStore:
    parsed = urlparse(url)
    if parsed.scheme == "":
        return LocalBlobStore(url)
    if parsed.scheme == "file":
        # file:///abs/path (or file://localhost/abs/path); file://var/blobs is read
        # as the relative path var/blobs, not as host "var" and path /blobs.
        return LocalBlobStore(parsed.path if parsed.netloc in ("", "localhost") else parsed.netloc + parsed.path)
    raise ValueError(f"unsupported BLOB_URL scheme {parsed.scheme!r} in {url!r} (supported: file://)")


def image_prefix(tenant_id: str, job_id: str, image_id: str) -> str:
    return f"tenants/{tenant_id}/jobs/{job_id}/{image_id}"


def job_prefix(tenant_id: str, job_id: str) -> str:
    return f"tenants/{tenant_id}/jobs/{job_id}"
