"""A small Python client for the Bone Detect HTTP API (standard library only).

    client = Client("http://127.0.0.1:8000", api_key)
    job = client.submit([("a.jpg", jpeg_bytes), ...], label="night batch")
    job = client.submit_in_parts(paths_of_a_night, part_size=256, uploaders=4)   # or in parts, sent at once
    status = client.wait(job["job_id"])
    for image in client.images(job["job_id"]): ...
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import uuid
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator


class ApiError(RuntimeError):
    def __init__(self, status: int, body: bytes):
        self.status = status
        self.body = body
        try:
            message = json.loads(body).get("error", body[:200])
        except (ValueError, AttributeError):
            message = body[:200]
        super().__init__(f"HTTP {status}: {message}")


class PartsFailed(RuntimeError):
    """Parts of ``submit_in_parts`` that failed after their retries. ``resumable``: the job still
    takes parts: call ``submit_in_parts`` again with the same files, part_size and
    ``idempotency_key=err.idempotency_key`` to finish it, or cancel it (``DELETE /v1/jobs/<job_id>``).
    Not resumable: the job takes no more parts (closed or cancelled meanwhile): send the batch again
    as a new job."""

    def __init__(self, job_id: str, idempotency_key: str, failed: list[tuple[int, Exception]]):
        self.job_id, self.idempotency_key, self.failed = job_id, idempotency_key, failed
        self.resumable = not any(isinstance(e, ApiError) and e.status == 409 for _, e in failed)
        what = (f"the job is still open: call again with idempotency_key={idempotency_key!r}" if self.resumable
                else "the job takes no more parts (closed or cancelled): send the batch as a new job")
        super().__init__(f"job {job_id}: {len(failed)} part(s) failed ({', '.join(str(i) for i, _ in failed)}), "
                         f"the first with {failed[0][1]}; {what}")


class JobNotOpen(RuntimeError):
    """``submit_in_parts`` called again for a job that was cancelled (by a DELETE, or cut short by the
    reconciler after OPEN_JOB_IDLE_HOURS without a part): send the batch as a new job."""


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header given in seconds (dates are not used by the API)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class MultipartBody:
    """A multipart/form-data body streamed from its parts: bytes-like
    objects, or files read from disk 1 MiB at a time, so a night's batch is
    never whole in the client's memory. Iterable again for each retry;
    ``len()`` is its Content-Length, from the files' sizes when it was made:
    a file that changed size since is an error, not a malformed request."""

    CHUNK = 1024 * 1024

    def __init__(self, fields: list[tuple[str, str]], files: list[tuple[str, str, "bytes | str | os.PathLike"]]):
        self.boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self._parts: list[memoryview | tuple[Path, int]] = []
        for name, value in fields:
            self._add(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, filename, source in files:
            safe = filename.replace('"', "%22").replace("\r", "").replace("\n", "")
            self._add((
                f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode("utf-8"))
            try:
                self._parts.append(memoryview(source).cast("B"))  # bytes, bytearray, mmap, array ...: not copied
            except TypeError:
                path = Path(os.fspath(source))
                self._parts.append((path, path.stat().st_size))
            self._add(b"\r\n")
        self._add(f"--{self.boundary}--\r\n".encode())

    def _add(self, data: bytes) -> None:
        self._parts.append(memoryview(data))

    def __len__(self) -> int:
        return sum(p.nbytes if isinstance(p, memoryview) else p[1] for p in self._parts)

    def __iter__(self):
        for part in self._parts:
            if isinstance(part, memoryview):
                yield part
                continue
            path, size = part
            with open(path, "rb") as fh:
                left = size
                while left:
                    chunk = fh.read(min(self.CHUNK, left))
                    if not chunk:
                        raise OSError(f"{path} shrank from {size} bytes while it was being sent")
                    left -= len(chunk)
                    yield chunk
                if fh.read(1):
                    raise OSError(f"{path} grew past {size} bytes while it was being sent")


def encode_multipart(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) for form fields and (field, filename, bytes) files, in memory."""
    body = MultipartBody(fields, files)
    return b"".join(bytes(chunk) for chunk in body), body.content_type


RETRY_STATUSES = (502, 503, 504)  # the API (or its load balancer) says: not now, try again
FINISHED = ("done", "done_with_errors", "cancelled")  # a job in any other state (receiving, queued, processing) goes on


def images_through(job: dict) -> int:
    """A job answer's images that are through: done, failed or cancelled."""
    counts = job.get("counts") or {}
    return sum(counts.get(status, 0) for status in ("done", "failed", "cancelled"))


class PollPacer:
    """How long to wait before looking at a job again, from what the looks so
    far saw, within [``shortest``, ``longest``]. Once images finish, the
    job's rate since the first look that saw it moving (an image processing
    or finished: a job may wait in the queue first) gives the time its last
    image should finish, counted from the last look that saw a change
    (images finish a chunk at a time); the wait is ``share`` of the time
    until then: with share 0.05, a job due in a minute is looked at every
    3 s, one due in 2 s every 0.1 s. While nothing has finished since the
    first look (a job queued behind others, a chunk still running), and once
    the time it was due has passed (a slow last chunk; an open job that has
    finished what it was sent), the wait is ``patience`` of the time since
    then: with 0.1, a job done within ten ``shortest`` waits is seen as soon
    as with a look every ``shortest``, and one seen late is seen at most a
    tenth late."""

    def __init__(self, shortest: float, longest: float, share: float = 0.05, patience: float = 0.1):
        if shortest <= 0 or longest < shortest:
            raise ValueError(f"poll intervals need 0 < shortest <= longest, got {shortest} and {longest}")
        self.shortest, self.longest, self.share, self.patience = shortest, longest, share, patience
        self.first: tuple[float, int] | None = None  # (time, finished) at the first look
        self.moving: float | None = None  # the first look that saw an image processing or finished
        self.changed: tuple[float, int] | None = None  # the last look that saw a change

    def next_delay(self, now: float, finished: int, total: int, processing: int = 0) -> float:
        if self.first is None:
            self.first = (now, finished)
        if finished != (self.changed or self.first)[1]:
            self.changed = (now, finished)
        if self.moving is None and (processing > 0 or self.changed is not None):
            self.moving = now
        if self.changed is None or self.changed[1] <= self.first[1]:
            return self._within(self.patience * (now - self.first[0]))
        (t1, f1), f0 = self.changed, self.first[1]
        end = t1 + max(0, total - f1) * (t1 - self.moving) / (f1 - f0)
        if now < end:
            return self._within(self.share * (end - now))
        return self._within(self.patience * (now - end))

    def _within(self, delay: float) -> float:
        return min(self.longest, max(self.shortest, delay))


class Client:
    """Args:
        retries: how often a request is tried again when the API is briefly
            away (restarting, its database failing over), waiting Retry-After
            when the API gives one, else 0.5, 1, 2 ... s with jitter (at most
            ``max_wait_s``). What is retried:

            - a refused connection, always (the request never reached the API);
            - 502/503/504 answers and dropped connections, for GET and HEAD,
              for a POST that carries an Idempotency-Key (``submit``,
              ``open_job`` and ``add_images`` always send one: a repeat is
              answered with the first job or part), and for ``close_job``;
            - a timeout waiting for the answer, for GET and HEAD only: a big
              upload the API is still storing is not sent a second time.

            DELETE is never repeated after it may have arrived (a purge that
            succeeded would answer the repeat with 404).
    """

    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0, retries: int = 5, max_wait_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.max_wait_s = max_wait_s

    def request(self, method: str, path: str, body: "bytes | MultipartBody | None" = None, headers: dict | None = None,
                idempotent: bool = False) -> bytes:
        """``idempotent``: a POST that may be repeated as a GET may (closing a job)."""
        headers = headers or {}
        reads = method in ("GET", "HEAD")
        keyed = reads or idempotent or (method == "POST" and "Idempotency-Key" in headers)
        for attempt in range(self.retries + 1):
            # a streamed body is a fresh generator per attempt, closed after it (its file with it)
            data = iter(body) if isinstance(body, MultipartBody) else body
            try:
                result = self._attempt(method, path, data, headers, attempt, keyed, reads)
            finally:
                if data is not body:
                    data.close()
            if result is not None:
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(self, method, path, body, headers, attempt, keyed, reads) -> bytes | None:
        """One try: the answer, or None after waiting when it should be tried again; raises otherwise."""
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.api_key}")
        for k, v in headers.items():
            req.add_header(k, v)
        last = attempt == self.retries
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as err:
            payload = err.read()
            if last or not keyed or err.code not in RETRY_STATUSES:
                raise ApiError(err.code, payload) from None
            wait = _retry_after(err.headers.get("Retry-After"))
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, ConnectionRefusedError):
                retry = True
            elif isinstance(reason, (ConnectionResetError, ConnectionAbortedError, http.client.RemoteDisconnected)):
                retry = keyed
            elif isinstance(reason, TimeoutError):
                retry = reads
            else:  # DNS, TLS, ...: not a moment's unavailability
                retry = False
            if last or not retry:
                raise
            wait = None
        if wait is None:
            wait = 0.5 * 2**attempt * (0.5 + random.random())  # jitter: clients do not come back in step
        time.sleep(min(self.max_wait_s, wait))
        return None

    def get_json(self, path: str) -> dict:
        return json.loads(self.request("GET", path))

    def submit(
        self,
        files: Iterable[tuple[str, "bytes | str | os.PathLike"]],
        label: str | None = None,
        external_ids: list[str] | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
    ) -> dict:
        """One job of ``files``: (name, bytes) or (name, path); paths are streamed
        from disk as the request is sent, so any number of files fits in memory."""
        fields = [("label", label)] if label else []
        fields += [("callback_url", callback_url)] if callback_url else []
        fields += [("external_id", e) for e in external_ids or []]
        body = MultipartBody(fields, [("files", name, data) for name, data in files])
        return self._post_form("/v1/jobs", body, idempotency_key)

    def open_job(self, label: str | None = None, callback_url: str | None = None, idempotency_key: str | None = None) -> dict:
        """A job that takes files in parts (``add_images``) until ``close_job``: its first
        radiographs are processed while the rest are still being sent."""
        fields = [("open", "true")] + ([("label", label)] if label else [])
        fields += [("callback_url", callback_url)] if callback_url else []
        body = MultipartBody(fields, [])
        return self._post_form("/v1/jobs", body, idempotency_key)

    def add_images(
        self,
        job_id: str,
        files: Iterable[tuple[str, "bytes | str | os.PathLike"]],
        external_ids: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict:
        """One part of an open job: committed whole and queued at once. Sent again after a lost answer
        with the same key, it is answered with the first part's positions, never added twice."""
        body = MultipartBody([("external_id", e) for e in external_ids or []],
                             [("files", name, data) for name, data in files])
        return self._post_form(f"/v1/jobs/{job_id}/images", body, idempotency_key)

    def close_job(self, job_id: str) -> dict:
        """No more parts: the job finishes when its images have. Safe to repeat."""
        return json.loads(self.request("POST", f"/v1/jobs/{job_id}/close", b"", idempotent=True))

    def submit_in_parts(
        self,
        files: Iterable[tuple[str, "bytes | str | os.PathLike"]],
        label: str | None = None,
        callback_url: str | None = None,
        part_size: int = 256,
        uploaders: int = 4,
        idempotency_key: str | None = None,
    ) -> dict:
        """One job of ``files``, sent as parts of ``part_size`` files by ``uploaders`` connections at
        once, then closed; returns the open job's answer. Workers start on the first part while the
        others are sent, and several connections reach several API processes.

        Every request carries a key made from ``idempotency_key`` (the job's; the parts' are it plus
        their index), so a call that failed part-way (``PartsFailed``, after the retries) can be made
        again with the same key, files, label and part_size: the same job, the parts already in
        answered, not added again, the rest sent, then closed. A job never closed is cut short
        ("cancelled") by the reconciler after OPEN_JOB_IDLE_HOURS without a part; calling again for
        it raises ``JobNotOpen``."""
        from concurrent.futures import ThreadPoolExecutor

        files = list(files)
        if not files or part_size < 1:
            raise ValueError("submit_in_parts needs files, and a part_size of at least 1")
        key = idempotency_key or f"client-{uuid.uuid4().hex}"
        parts = [files[i : i + part_size] for i in range(0, len(files), part_size)]
        if len(f"{key}-part-{len(parts)}") > 200:  # the API's limit on an Idempotency-Key
            raise ValueError("idempotency_key is too long: at most 200 characters with '-part-<index>' added")
        job = self.open_job(label=label, callback_url=callback_url, idempotency_key=key)
        if "parts_url" not in job:  # called again for a job that takes no more parts
            now = self.job(job["job_id"])
            if now["cancelled_at"] is not None:
                raise JobNotOpen(f"job {job['job_id']} was cancelled ({now['status']}, {now['counts']}): "
                                 "send the batch as a new job, with a new idempotency key")

        def send(index: int):
            try:
                self.add_images(job["job_id"], parts[index], idempotency_key=f"{key}-part-{index}")
            except Exception as err:  # noqa: BLE001  (reported together, below)
                return index, err
            return None

        with ThreadPoolExecutor(max(1, min(uploaders, len(parts))), thread_name_prefix="bonedetect-part") as pool:
            failed = [f for f in pool.map(send, range(len(parts))) if f]
        if failed:
            raise PartsFailed(job["job_id"], key, failed)
        self.close_job(job["job_id"])
        return job

    def _post_form(self, path: str, body: MultipartBody, idempotency_key: str | None) -> dict:
        # Always a key: a request retried after a lost answer then gives the same job or part, never a second one.
        headers = {"Content-Type": body.content_type, "Content-Length": str(len(body)),
                   "Idempotency-Key": idempotency_key or f"client-{uuid.uuid4().hex}"}
        return json.loads(self.request("POST", path, body, headers))

    def job(self, job_id: str) -> dict:
        return self.get_json(f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.5, on_poll=None,
             max_poll: float | None = None) -> dict:
        """Poll the job until it finishes; its last answer. ``poll``: the
        shortest time between two looks; ``max_poll`` (default 10 x ``poll``)
        the longest. Between the two, the job's progress sets the pace
        (``PollPacer``): seldom while its end is far, every ``poll`` near it,
        so that a night's batch is not asked about twice a second for hours,
        and its end is still seen within about ``poll`` while its rate
        holds (at most a tenth of the time it ran late when it does not)."""
        deadline = time.monotonic() + timeout
        pacer = PollPacer(poll, max_poll if max_poll is not None else 10 * poll)
        while True:
            job = self.job(job_id)
            if on_poll:
                on_poll(job)
            if job["status"] in FINISHED:
                return job
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s: {job['counts']}")
            delay = pacer.next_delay(now, images_through(job), job.get("total", 0), (job.get("counts") or {}).get("processing", 0))
            time.sleep(min(delay, deadline - now + poll))

    def images(self, job_id: str, limit: int = 500) -> Iterator[dict]:
        cursor = None
        while True:
            query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
            page = self.get_json(f"/v1/jobs/{job_id}/images{query}")
            yield from page["images"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def results_csv(self, job_id: str) -> str:
        return self.request("GET", f"/v1/jobs/{job_id}/results.csv").decode("utf-8")

    def mask_png(self, image_id: str) -> bytes:
        return self.request("GET", f"/v1/images/{image_id}/mask.png")

    def overlay_png(self, image_id: str) -> bytes:
        return self.request("GET", f"/v1/images/{image_id}/overlay.png")

    def seg_dcm(self, image_id: str) -> bytes:
        """The DICOM SEG of an image uploaded as DICOM."""
        return self.request("GET", f"/v1/images/{image_id}/seg.dcm")
