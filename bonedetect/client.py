"""A small Python client for the Bone Detect HTTP API (standard library only).

    client = Client("http://127.0.0.1:8000", api_key)
    job = client.submit([("a.jpg", jpeg_bytes), ...], label="night batch")
    status = client.wait(job["job_id"])
    for image in client.images(job["job_id"]): ...
"""

from __future__ import annotations

import json
import time
import uuid
import urllib.error
import urllib.request
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


def encode_multipart(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) for form fields and (field, filename, bytes) files."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, filename, data in files:
        safe = filename.replace('"', "%22").replace("\r", "").replace("\n", "")
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode("utf-8") + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Client:
    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.api_key}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as err:
            raise ApiError(err.code, err.read()) from None

    def get_json(self, path: str) -> dict:
        return json.loads(self.request("GET", path))

    def submit(
        self,
        files: Iterable[tuple[str, bytes]],
        label: str | None = None,
        external_ids: list[str] | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
    ) -> dict:
        fields = [("label", label)] if label else []
        fields += [("callback_url", callback_url)] if callback_url else []
        fields += [("external_id", e) for e in external_ids or []]
        body, ctype = encode_multipart(fields, [("files", name, data) for name, data in files])
        headers = {"Content-Type": ctype}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return json.loads(self.request("POST", "/v1/jobs", body, headers))

    def job(self, job_id: str) -> dict:
        return self.get_json(f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.5, on_poll=None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_poll:
                on_poll(job)
            if job["status"] in ("done", "done_with_errors", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s: {job['counts']}")
            time.sleep(poll)

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
