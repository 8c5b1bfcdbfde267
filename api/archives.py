"""Zip archives in a submission: a study folder (with its DICOMDIR) sent as one file.

`expand_uploads` turns a submission's files into the entries that become image
rows: a plain file is one entry; a zip archive is one entry per member file,
in the archive's order, each named "<archive name>/<path in the archive>" and
carrying the archive's external id. Skipped: directories, DICOMDIR, dotfiles
and macOS resource forks (__MACOSX/).

Zip bombs are refused before anything is decompressed, from the archive's
central directory: its entry count (checked before zipfile reads the
directory into memory), the job's file count against max_files_per_job,
each member's size against max_file_bytes (a larger member becomes a failed
row, the rest goes on) and the total expanded size against
max_request_bytes (the request is refused). zipfile never returns more bytes
than a member declares, and the blob store caps each member again while it
streams, in 1 MiB chunks, from the spooled upload: no member is ever whole in
memory. A member that is itself a zip, encrypted, compressed with a method
zipfile lacks, or corrupt becomes a failed row with its reason.
"""

from __future__ import annotations

import posixpath
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from api.errors import ApiError
from api.uploads import MAX_FILENAME, Submission, sanitize_filename, stream_size
from bonedetect.formats import HEAD_BYTES, sniff_format
from bonedetect.settings import Settings

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record
SKIPPED_NAMES = {"DICOMDIR"}
ENTRY_SLACK = 2  # raw entries (with directories and skipped files) allowed per counted file


class ArchiveError(ValueError):
    """A member cannot be read; str(err) is the reason recorded on its row."""


@dataclass
class Entry:
    """One future image row: a stream to store, or the reason it failed."""

    filename: str | None
    external_id: str | None
    stream: BinaryIO | None  # None when `error` is set
    size: int  # bytes (as declared in the archive for a member)
    error: str | None = None


def is_zip(head: bytes) -> bool:
    """A zip archive, and not an image that happens to carry one (a JPEG with a zip appended)."""
    return sniff_format(head) is None and head[:4] in ZIP_MAGIC


def is_zip_stream(stream: BinaryIO) -> bool:
    head = stream.read(HEAD_BYTES)
    stream.seek(0)
    return is_zip(head)


class _Budget:
    """What the whole submission may still expand to."""

    def __init__(self, settings: Settings, plain_files: int, scope: str = "job"):
        self.settings, self.scope = settings, scope  # "job", or "request" for a part of a job in parts
        self.rows = plain_files  # rows already promised: every plain file is one
        self.expanded_bytes = 0

    def take(self, archive: str, files: int, total_bytes: int) -> None:
        limit = self.settings.max_files_per_job
        if self.rows + files > limit:
            raise ApiError(
                400, f"archive {archive!r} holds {files} files: the {self.scope} would have {self.rows + files}, "
                f"above the limit of {limit} per {self.scope}",
            )
        if self.expanded_bytes + total_bytes > self.settings.max_request_bytes:
            raise ApiError(
                413, f"archive {archive!r} expands to {total_bytes} bytes: the submission would exceed "
                f"the limit of {self.settings.max_request_bytes} bytes",
            )
        self.rows += files
        self.expanded_bytes += total_bytes


def expand_uploads(sub: Submission, settings: Settings) -> Iterator[Entry]:
    """Every image row of the submission, in order; raises ApiError for an archive over a limit."""
    kinds = [is_zip_stream(f.stream) for f in sub.files]
    budget = _Budget(settings, plain_files=kinds.count(False), scope=sub.limit_scope)
    for upload, external_id, archive in zip(sub.files, sub.external_ids, kinds, strict=True):
        name = sanitize_filename(upload.filename)
        if archive:
            yield from _members(upload.stream, name or "archive.zip", external_id, settings, budget)
        else:
            yield Entry(name, external_id, upload.stream, stream_size(upload.stream))


def _wanted(info: zipfile.ZipInfo) -> bool:
    if info.is_dir():
        return False
    parts = info.filename.replace("\\", "/").split("/")
    base = parts[-1]
    return bool(base) and not base.startswith(".") and "__MACOSX" not in parts and base.upper() not in SKIPPED_NAMES


def member_filename(archive: str, path: str) -> str:
    """"<archive>/<path>" without control characters or dot segments, at most 300 characters (the tail)."""
    path = unicodedata.normalize("NFC", path).replace("\\", "/")
    path = "".join(ch for ch in path if unicodedata.category(ch) not in ("Cc", "Cf"))
    parts = [p for p in path.split("/") if p not in ("", ".", "..")]
    name = posixpath.join(archive, *parts)
    return name if len(name) <= MAX_FILENAME else "..." + name[-(MAX_FILENAME - 3) :]


def _entry_count(stream: BinaryIO) -> int | None:
    """Entries in the central directory, from its end record, before zipfile reads them all."""
    try:
        record = zipfile._EndRecData(stream)  # the stdlib's own reader of that record
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    finally:
        stream.seek(0)
    return None if record is None else int(record[zipfile._ECD_ENTRIES_TOTAL])


def _members(stream: BinaryIO, archive: str, external_id: str | None, settings: Settings, budget: _Budget):
    size = stream_size(stream)
    entries = _entry_count(stream)
    if entries is not None and entries > ENTRY_SLACK * settings.max_files_per_job:
        raise ApiError(400, f"archive {archive!r} has {entries} entries, above the limit of "
                            f"{settings.max_files_per_job} files per {budget.scope}")
    try:
        zf = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError) as err:
        budget.take(archive, 1, 0)
        yield Entry(archive, external_id, None, size, error=f"not a readable zip archive: {err}")
        return
    with zf:
        infos = [i for i in zf.infolist() if _wanted(i)]
        if not infos:
            error = "zip archive holds no files (only directories, DICOMDIR or hidden files)"
            budget.take(archive, 1, 0)
            yield Entry(archive, external_id, None, size, error=error)
            return
        fitting = [i for i in infos if i.file_size <= settings.max_file_bytes]
        budget.take(archive, len(infos), sum(i.file_size for i in fitting))
        for info in infos:
            name = member_filename(archive, info.filename)
            if info.file_size > settings.max_file_bytes:
                error = f"zip member is {info.file_size} bytes, above the limit of {settings.max_file_bytes} bytes"
                yield Entry(name, external_id, None, info.file_size, error=error)
                continue
            try:
                member = zf.open(info)
            except (NotImplementedError, RuntimeError, zipfile.BadZipFile, zlib.error, OSError, ValueError) as err:
                # RuntimeError: encrypted; NotImplementedError: a compression method zipfile lacks
                yield Entry(name, external_id, None, info.file_size, error=f"unreadable zip member: {err}")
                continue
            with member:
                reader = _MemberReader(member, name)
                try:
                    nested = is_zip(reader.read(HEAD_BYTES))
                    reader.seek(0)
                except ArchiveError as err:
                    yield Entry(name, external_id, None, info.file_size, error=str(err))
                    continue
                if nested:
                    error = "a zip archive inside a zip archive is not expanded: send its files, or it as its own file"
                    yield Entry(name, external_id, None, info.file_size, error=error)
                    continue
                yield Entry(name, external_id, reader, info.file_size)


class _MemberReader:
    """A zip member's stream whose read errors (bad CRC, truncated data) are ArchiveError."""

    def __init__(self, member: BinaryIO, name: str):
        self.member, self.name = member, name

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
            raise ArchiveError(f"corrupt zip member: {err}") from None

    def read(self, size: int = -1) -> bytes:
        return self._guard(self.member.read, size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._guard(self.member.seek, offset, whence)
