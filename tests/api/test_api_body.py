"""Large request bodies are read from the server 1 MiB at a time (api.uploads.buffered_body), never
past their Content-Length; and an upload through gunicorn, the API's server in docker-compose.yml,
arrives byte for byte."""

from __future__ import annotations

import io
from pathlib import Path

from api.uploads import BODY_BUFFER, buffered_body


def run(body_size: int, extra: bytes = b"GET /next HTTP/1.1\r\n\r\n", environ: dict | None = None):
    body = bytes(range(256)) * (body_size // 256) + b"x" * (body_size % 256)
    stream = io.BytesIO(body + extra)
    seen = {}

    def app(environ, start_response):
        data = b""
        while chunk := environ["wsgi.input"].read(64 * 1024):  # as werkzeug's multipart parser reads
            data += chunk
        seen.update(data=data, wrapped=environ["wsgi.input"] is not stream)
        return []

    raw_read = stream.read

    def counting_read(n=-1):
        out = raw_read(n)
        seen.setdefault("sizes", []).append(len(out))
        return out

    stream.read = counting_read
    buffered_body(app)({"CONTENT_LENGTH": str(len(body)), "wsgi.input": stream, **(environ or {})}, None)
    return body, stream, seen


def test_a_large_body_is_read_in_large_pieces_and_never_past_its_length():
    body, stream, seen = run(3 * BODY_BUFFER + 12345)
    assert seen["wrapped"] and seen["data"] == body
    assert stream.tell() == len(body), "the next request's bytes stay with the server"
    assert max(seen["sizes"]) == BODY_BUFFER and len([s for s in seen["sizes"] if s]) == 4


def test_a_small_or_chunked_body_is_left_as_the_server_gave_it():
    body, stream, seen = run(1000, extra=b"")
    assert not seen["wrapped"] and seen["data"] == body
    body, stream, seen = run(2 * BODY_BUFFER, extra=b"", environ={"HTTP_TRANSFER_ENCODING": "chunked"})
    assert not seen["wrapped"] and seen["data"] == body


def test_an_upload_through_gunicorn_arrives_whole(tmp_path):
    """docker-compose.yml's server: three files of 1.5 MB (past the 1 MiB buffer, past the 500 KB
    spool) and a small one, each stored byte for byte and in order."""
    from bench.throughput import running_system
    from bonedetect.client import Client

    files = [(f"{i}.png", b"\x89PNG\r\n\x1a\n" + bytes([i]) * 1_500_000 + bytes(range(256))) for i in range(3)]
    files.insert(1, ("small.png", b"\x89PNG\r\n\x1a\n" + b"s" * 1000))
    checkpoint = Path(__file__).resolve().parents[2] / "model" / "checkpoints" / "synthetic-demo.pt"
    with running_system(checkpoint, workers=0, threads=1, batch=None, chunk=8, io_threads=1, api_workers=1) as system:
        client = Client(system.api.url, system.key)
        job = client.submit(files)
        assert job["accepted"] == 4
        images = list(client.images(job["job_id"]))
        got = [client.request("GET", f"/v1/images/{im['image_id']}/source") for im in images]
    assert [im["filename"] for im in images] == [name for name, _ in files]
    assert got == [data for _, data in files]
