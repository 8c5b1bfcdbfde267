"""The blob store: uploaded radiographs, masks and overlays.

Redis never holds pixels (claim check): tasks carry image ids, workers read
the bytes from here. `BLOB_URL=file:///path` is a local or shared folder
(a docker volume shared by API and workers); `BLOB_URL=s3://bucket/prefix`
is an S3-compatible object store that workers on several hosts reach (AWS
S3, MinIO: the endpoint from `S3_ENDPOINT_URL`, credentials from the usual
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
import uuid
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


# what open(O_TMPFILE) fails with where the filesystem or kernel has none (open(2))
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT}
STAGE_IN_MEMORY = 500 * 1024  # werkzeug's own threshold: smaller uploads stay in memory, as they did


class StagedFile(tempfile.SpooledTemporaryFile):
    """An incoming upload for a LocalBlobStore. Up to 500 KB it is held in
    memory, as werkzeug's spool holds it (no file handle; stored by a copy);
    past that it continues as an unnamed file in the store's own folder
    (Linux O_TMPFILE), which put_stream names with a hard link instead of
    copying its bytes. Closed unnamed, or with the process killed, it is gone."""

    def __init__(self, store: LocalBlobStore):
        super().__init__(max_size=STAGE_IN_MEMORY, mode="w+b")
        self.root = store.root
        self._store = store
        self.unnamed_fd: int | None = None  # the O_TMPFILE's descriptor, once rolled over into the store

    def rollover(self) -> None:
        if self._rolled:
            return
        fd = self._store._open_unnamed()
        if fd is None:
            return super().rollover()  # a temporary file under TMPDIR, to be copied, as werkzeug's spool does
        memory, self._file = self._file, io.open(fd, "w+b")
        position = memory.tell()
        self._file.write(memory.getvalue())
        self._file.seek(position)
        self._rolled, self.unnamed_fd = True, fd


class LocalBlobStore:
    """Blobs as files under one root; every write is atomic (temp file + rename),
    so a reader never sees half a file and rewriting a key is idempotent."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._can_stage = hasattr(os, "O_TMPFILE")

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"blob key escapes the store: {key!r}")
        return path

    def staging_file(self) -> StagedFile | None:
        """A file for an incoming upload (StagedFile), which put_stream links
        into place rather than copying once it is past 500 KB; None once the
        store's filesystem has said it has no O_TMPFILE (NFS, say): the caller
        then spools uploads elsewhere and put_stream copies them."""
        return StagedFile(self) if self._can_stage else None

    def _open_unnamed(self) -> int | None:
        if not self._can_stage:
            return None
        try:
            return os.open(self.root, os.O_TMPFILE | os.O_RDWR, 0o600)  # not O_EXCL: it may be linked
        except OSError as err:
            if err.errno in _NO_TMPFILE and self.root.is_dir():  # (ENOENT: also a folder not mounted yet)
                self._can_stage = False  # the filesystem's answer: ask once
            return None  # out of file handles or space, say: this upload, the ordinary way

    def put_stream(self, key: str, fileobj: BinaryIO, max_bytes: int | None = None) -> int:
        """Copy a stream in 1 MiB chunks (never whole in memory); TooLarge past max_bytes.
        A StagedFile of this store past 500 KB, at its start, is linked into place, not copied."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if (isinstance(fileobj, StagedFile) and fileobj.unnamed_fd is not None and fileobj.root == self.root
                and fileobj.tell() == 0):
            size = self._link_staged(fileobj, path, max_bytes)
            if size is not None:
                return size
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

    @staticmethod
    def _link_staged(staged: StagedFile, path: Path, max_bytes: int | None) -> int | None:
        """The staged file's size once it is named `path`; None where the link
        cannot be made (no /proc), for put_stream to copy it instead."""
        staged.flush()
        size = os.fstat(staged.unnamed_fd).st_size
        if max_bytes is not None and size > max_bytes:
            raise TooLarge(f"file is larger than the limit of {max_bytes} bytes")
        tmp = path.parent / f".upload-{uuid.uuid4().hex}"
        try:
            # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd names an O_TMPFILE file (open(2)).
            # A dir fd makes CPython call linkat with that flag; without one it calls link(2),
            # which links the /proc symlink itself and fails (EXDEV).
            parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(f"/proc/self/fd/{staged.unnamed_fd}", tmp.name, dst_dir_fd=parent, follow_symlinks=True)
            finally:
                os.close(parent)
        except OSError:
            return None
        try:
            os.replace(tmp, path)  # as every write here: the key appears whole, or rewritten whole
        except BaseException:
            tmp.unlink(missing_ok=True)
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


class S3BlobStore:
    """Blobs as objects under `prefix` in one S3 bucket (boto3; any S3-compatible server).

    A PUT is atomic in S3, so a reader never sees half an object and rewriting
    a key is idempotent, as with LocalBlobStore. An upload is spooled (memory,
    then a temp file past 8 MiB) while its size is checked, so a file over
    the limit is never sent and a stream is never whole in memory.
    """

    SPOOL_MEMORY = 8 * 1024 * 1024

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client=None):
        if not bucket:
            raise ValueError("an S3 blob store needs a bucket: BLOB_URL=s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=10,
                read_timeout=120,
                # MinIO and most S3-compatible servers want bucket names in the path, not the host
                s3={"addressing_style": "path" if endpoint_url else "auto"},
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)
        self.client = client  # boto3 clients are thread-safe

    def __repr__(self) -> str:
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix})"

    def _key(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
            raise ValueError(f"invalid blob key: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    @staticmethod
    def _missing(err) -> bool:
        code = str(err.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def put_stream(self, key: str, fileobj: BinaryIO, max_bytes: int | None = None) -> int:
        """Copy a stream in 1 MiB chunks; TooLarge past max_bytes (nothing is stored then)."""
        name = self._key(key)
        size = 0
        with tempfile.SpooledTemporaryFile(max_size=self.SPOOL_MEMORY) as spool:
            while chunk := fileobj.read(CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise TooLarge(f"file is larger than the limit of {max_bytes} bytes")
                spool.write(chunk)
            spool.seek(0)
            self.client.upload_fileobj(spool, self.bucket, name)
        return size

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as err:
            if self._missing(err):
                raise BlobNotFound(key) from None
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as err:
            if self._missing(err):
                return False
            raise

    def delete_prefix(self, prefix: str) -> None:
        """Delete the object named `prefix` and every object under `prefix/`."""
        base = self._key(prefix.rstrip("/"))
        names = [base]
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + "/"):
            names += [obj["Key"] for obj in page.get("Contents", [])]
        for start in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": n} for n in names[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def open_blob_store(url: str, *, endpoint_url: str | None = None) -> BlobStore:
    """`file:///path` (or a bare path): LocalBlobStore; `s3://bucket/prefix`: S3BlobStore,
    its endpoint `endpoint_url` or else $S3_ENDPOINT_URL (unset: AWS, or boto3's own AWS_ENDPOINT_URL)."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return LocalBlobStore(url)
    if parsed.scheme == "file":
        # file:///abs/path (or file://localhost/abs/path); file://var/blobs is read
        # as the relative path var/blobs, not as host "var" and path /blobs.
        return LocalBlobStore(parsed.path if parsed.netloc in ("", "localhost") else parsed.netloc + parsed.path)
    if parsed.scheme == "s3":
        endpoint = endpoint_url or os.environ.get("S3_ENDPOINT_URL") or None
        return S3BlobStore(parsed.netloc, parsed.path, endpoint_url=endpoint)
    raise ValueError(f"unsupported BLOB_URL scheme {parsed.scheme!r} in {url!r} (supported: file://, s3://)")


def image_prefix(tenant_id: str, job_id: str, image_id: str) -> str:
    return f"tenants/{tenant_id}/jobs/{job_id}/{image_id}"


def job_prefix(tenant_id: str, job_id: str) -> str:
    return f"tenants/{tenant_id}/jobs/{job_id}"
