"""The Python client rides out an API that says "not now" (502/503/504, with or
without Retry-After) or drops connections, for requests safe to repeat only.
A real HTTP server on loopback plays an API in the middle of a restart."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bonedetect.client import ApiError, Client, PollPacer


class Flaky:
    """Answers 503 to the first `fail` requests (Retry-After 0), then 200 with what it saw."""

    def __init__(self, fail: int, status: int = 503, port: int = 0):
        self.fail, self.status, self.seen = fail, status, []
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                flaky.seen.append((self.command, self.headers.get("Idempotency-Key"), len(body)))
                if len(flaky.seen) <= flaky.fail:
                    payload, code = json.dumps({"error": "database unavailable, retry later"}).encode(), flaky.status
                else:
                    payload, code = json.dumps({"job_id": "j1", "status": "queued", "counts": {}}).encode(), 200
                self.send_response(code)
                if code == 503:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky():
    servers = []

    def make(fail, status=503):
        servers.append(Flaky(fail, status))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_get_is_retried_through_503s_and_502s(flaky):
    api = flaky(3)
    assert Client(api.url, "k", retries=5).job("j1")["job_id"] == "j1"
    assert [m for m, _, _ in api.seen] == ["GET"] * 4
    api = flaky(2, status=502)  # no Retry-After: short backoff
    assert Client(api.url, "k", retries=5, max_wait_s=0.05).job("j1")["status"] == "queued"
    assert len(api.seen) == 3


def test_retries_run_out_with_the_api_error(flaky):
    api = flaky(10)
    with pytest.raises(ApiError) as err:
        Client(api.url, "k", retries=2).job("j1")
    assert err.value.status == 503 and "retry later" in str(err.value) and len(api.seen) == 3


def test_submit_always_sends_an_idempotency_key_so_its_retries_are_one_job(flaky):
    api = flaky(2)
    Client(api.url, "k").submit([("a.jpg", b"\xff\xd8" + b"x" * 100)])
    keys = {key for _, key, _ in api.seen}
    assert len(api.seen) == 3 and len(keys) == 1 and None not in keys, "the same key on every try"
    assert all(size > 100 for _, _, size in api.seen), "the whole body each time"
    api = flaky(0)
    Client(api.url, "k").submit([("b.jpg", b"y")], idempotency_key="night-42")
    assert api.seen[0][1] == "night-42"


def test_a_part_and_a_close_are_retried_as_one(flaky):
    """A part always carries a key (the same on every try); closing a job is retried without one."""
    api = flaky(2)
    Client(api.url, "k").add_images("j1", [("a.jpg", b"\xff\xd8" + b"x" * 100)])
    keys = {key for _, key, _ in api.seen}
    assert len(api.seen) == 3 and len(keys) == 1 and None not in keys
    api = flaky(2)
    Client(api.url, "k").close_job("j1")
    assert [(m, key) for m, key, _ in api.seen] == [("POST", None)] * 3


def test_a_post_without_a_key_is_not_repeated(flaky):
    api = flaky(1)
    with pytest.raises(ApiError) as err:
        Client(api.url, "k").request("POST", "/v1/jobs", b"{}", {"Content-Type": "application/json"})
    assert err.value.status == 503 and len(api.seen) == 1


def test_a_refused_connection_is_retried_until_the_api_is_back():
    import socket
    import time

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens here now
    with pytest.raises(OSError, match="(?i)refused"):
        Client(f"http://127.0.0.1:{port}", "k", retries=1, max_wait_s=0.05).job("j1")
    started = []
    timer = threading.Timer(0.4, lambda: started.append(Flaky(0, port=port)))  # the API comes back
    timer.start()
    try:
        t0 = time.monotonic()
        assert Client(f"http://127.0.0.1:{port}", "k", retries=6, max_wait_s=0.2).job("j1")["job_id"] == "j1"
        assert time.monotonic() - t0 >= 0.4
    finally:
        timer.join()
        for server in started:
            server.close()


def test_delete_and_unkeyed_posts_are_not_repeated_once_they_may_have_arrived(flaky):
    api = flaky(1)
    with pytest.raises(ApiError) as err:
        Client(api.url, "k").request("DELETE", "/v1/jobs/j1?purge=true")
    assert err.value.status == 503 and [m for m, _, _ in api.seen] == ["DELETE"]


def test_a_submit_that_times_out_is_not_uploaded_again(flaky):
    import time

    api = flaky(0)
    real = api.server.RequestHandlerClass.do_POST

    def slow(self):
        time.sleep(0.5)  # the API is still storing a big batch
        real(self)

    api.server.RequestHandlerClass.do_POST = slow
    with pytest.raises(OSError, match="(?i)timed out"):
        Client(api.url, "k", timeout=0.2).submit([("a.jpg", b"\xff\xd8" + b"x" * 100)])
    time.sleep(0.6)
    assert len(api.seen) == 1, "one upload, not six"


def test_submit_streams_files_from_disk_and_sends_the_same_body_on_a_retry(flaky, tmp_path):
    """Paths are read as the request goes out (never the whole batch in memory); a retry sends it again whole."""
    from bonedetect.client import MultipartBody, encode_multipart

    big = tmp_path / "big.dcm"
    big.write_bytes(bytes(range(256)) * 12_000)  # 3 MB: several 1 MiB reads
    body = MultipartBody([("label", "night")], [("files", "a.jpg", b"\xff\xd8jpeg"), ("files", "big.dcm", big)])
    whole = b"".join(bytes(c) for c in body)
    assert len(body) == len(whole) and b"".join(bytes(c) for c in body) == whole, "re-iterable; len() is its Content-Length"
    assert max(len(chunk) for chunk in body) <= MultipartBody.CHUNK
    in_memory, _ = encode_multipart([("label", "night")], [("files", "a.jpg", b"\xff\xd8jpeg"), ("files", "big.dcm", big.read_bytes())])
    assert len(in_memory) == len(whole)
    api = flaky(1)
    Client(api.url, "k").submit([("a.jpg", b"\xff\xd8jpeg"), ("big.dcm", big)], label="night")
    assert [size for _, _, size in api.seen] == [len(whole), len(whole)], "the whole body, both times"


def test_a_file_that_changes_size_after_the_body_was_made_is_an_error_not_a_bad_request(tmp_path):
    import array

    from bonedetect.client import MultipartBody

    path = tmp_path / "export.dcm"
    path.write_bytes(b"x" * 1000)
    body = MultipartBody([], [("files", "export.dcm", path), ("files", "a.raw", array.array("H", [1, 2, 3]))])
    assert len(body) == len(b"".join(bytes(c) for c in body)), "buffers (array, mmap) are sent as they are"
    path.write_bytes(b"x" * 10)  # the PACS export was rewritten meanwhile
    with pytest.raises(OSError, match="shrank"):
        b"".join(bytes(c) for c in body)
    path.write_bytes(b"x" * 2000)
    with pytest.raises(OSError, match="grew"):
        b"".join(bytes(c) for c in body)


def test_submit_in_parts_reports_the_parts_that_failed_with_the_job_to_resume_and_does_not_close_it():
    """Part 1 of 3 is refused: the call raises PartsFailed with the job id and the key to call it
    again with; the other parts were sent, the job was not closed. The same call again with that key
    sends the same keys (the API answers the parts already in without adding them)."""
    from bonedetect.client import JobNotOpen, PartsFailed

    seen, refuse, state = [], {"on": True, "code": 400}, {"open": True, "cancelled_at": None}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code, body):
            payload = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            self._send(200, {"job_id": "j1", "status": "cancelled", "counts": {}, "cancelled_at": state["cancelled_at"]})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            key = self.headers.get("Idempotency-Key")
            seen.append((self.path, key))
            if refuse["on"] and key and key.endswith("-part-1"):
                return self._send(refuse["code"], {"error": "no"})
            job = {"job_id": "j1", **({"parts_url": "/v1/jobs/j1/images"} if state["open"] else {})}
            self._send(200 if self.path.endswith("/close") else 202, job)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = Client(f"http://127.0.0.1:{server.server_address[1]}", "k", retries=0)
        files = [(f"{i}.jpg", b"\xff\xd8" + bytes([i])) for i in range(5)]
        with pytest.raises(PartsFailed) as err:
            client.submit_in_parts(files, part_size=2, uploaders=2, idempotency_key="night-7")
        assert err.value.job_id == "j1" and err.value.idempotency_key == "night-7" and err.value.resumable
        assert [i for i, _ in err.value.failed] == [1] and "HTTP 400" in str(err.value) and "still open" in str(err.value)
        assert sorted(k for p, k in seen if p.endswith("/images")) == ["night-7-part-0", "night-7-part-1", "night-7-part-2"]
        assert not any(p.endswith("/close") for p, _ in seen), "an incomplete batch is not closed"
        first_round = list(seen)
        refuse["on"] = False
        assert client.submit_in_parts(files, part_size=2, idempotency_key="night-7")["job_id"] == "j1"
        again = seen[len(first_round):]
        assert again[0] == ("/v1/jobs", "night-7") and again[-1][0] == "/v1/jobs/j1/close"
        assert sorted(k for p, k in again if p.endswith("/images")) == ["night-7-part-0", "night-7-part-1", "night-7-part-2"]
        with pytest.raises(ValueError):
            client.submit_in_parts([])
        with pytest.raises(ValueError, match="too long"):
            client.submit_in_parts(files, idempotency_key="k" * 195)
        # a part refused because the job was closed or cancelled meanwhile: not resumable
        refuse.update(on=True, code=409)
        with pytest.raises(PartsFailed) as err:
            client.submit_in_parts(files, part_size=2)
        assert not err.value.resumable and "new job" in str(err.value)
        # called again for a job cut short: refused before a part is sent
        refuse["on"], state["open"], state["cancelled_at"] = False, False, "2026-12-06T00:00:00Z"
        before = len(seen)
        with pytest.raises(JobNotOpen):
            client.submit_in_parts(files, part_size=2, idempotency_key="night-7")
        assert [p for p, _ in seen[before:]] == ["/v1/jobs"]
    finally:
        server.shutdown()
        server.server_close()


# -- waiting for a job: looked at seldom while its end is far, often near it ---------------------


def chunked_job(images: int, chunk: int, seconds_per_image: float, start: float, last_late: float = 0.0):
    """A job whose images finish a chunk at a time, as a worker commits them:
    (finished at time t, the time its last image finishes)."""
    commits, done, t = [], 0, start
    while done < images:
        k = min(chunk, images - done)
        t += k * seconds_per_image + (last_late if done + k == images else 0.0)
        done += k
        commits.append((t, done))
    return (lambda now: max((n for at, n in commits if at <= now), default=0)), t


def look_until_done(pacer: PollPacer, finished_at, total: int, start: float = 0.0) -> tuple[list[float], float, list[float]]:
    """Looks at the job on the pacer's schedule (no sleeping: simulated time),
    its images processing from ``start``: the times of the looks until one
    saw it finished, that time, the waits."""
    now, looks, waits = 0.0, [], []
    while True:
        finished = finished_at(now)
        looks.append(now)
        if finished >= total:
            return looks, now, waits
        waits.append(pacer.next_delay(now, finished, total, processing=int(now >= start)))
        now += waits[-1]


def test_a_job_is_looked_at_a_third_as_often_as_every_poll_and_its_end_is_seen_within_a_poll():
    # the benchmark's 200 images on a 2-core CPU: chunks of 32, ~0.47 s an image, the first after 2 s
    finished_at, end = chunked_job(200, 32, 15 / 32, start=2.0)
    looks, seen, waits = look_until_done(PollPacer(0.1, 1.0), finished_at, 200, start=2.0)
    assert len(looks) < (end / 0.1) / 3 and len(looks) < (end / 0.25) / 2  # 160 here; every 0.25 s: 384
    assert end <= seen <= end + 0.1
    assert min(waits) == 0.1 and max(waits) == 1.0


def test_a_job_later_than_its_rate_promised_is_seen_at_most_a_tenth_late():
    finished_at, end = chunked_job(200, 32, 15 / 32, start=2.0, last_late=5.0)
    looks, seen, waits = look_until_done(PollPacer(0.1, 1.0), finished_at, 200, start=2.0)
    assert end <= seen <= end + 0.1 * 5.0 + 0.1  # the end was due 5 s before it came
    assert max(waits) <= 1.0


def test_a_small_job_done_at_once_is_seen_as_soon_as_with_a_look_every_poll():
    finished_at, end = chunked_job(6, 32, 0.7, start=0.0)  # one chunk: nothing finishes until all have
    looks, seen, waits = look_until_done(PollPacer(0.5, 5.0), finished_at, 6)
    assert waits == [0.5] * len(waits) and seen == 4.5


def test_a_night_batch_is_looked_at_every_few_seconds_not_twice_a_second():
    finished_at, end = chunked_job(5000, 32, 0.05, start=30.0)  # queued 30 s behind another job
    looks, seen, waits = look_until_done(PollPacer(0.5, 5.0), finished_at, 5000, start=30.0)
    assert len(looks) < (end / 0.5) / 4  # 119 here; every 0.5 s: 559
    assert end <= seen <= end + 0.5
    first_seen = next(t for t in looks if finished_at(t) > 0)
    assert first_seen <= 31.6 * 1.1  # while nothing finished, looked at within a tenth of the time waited
    assert max(waits) == 5.0


@pytest.mark.parametrize("shortest, longest", [(0.1, 1.0), (0.5, 5.0)])
def test_a_job_that_waited_in_the_queue_is_paced_by_its_rate_since_it_started_not_since_the_first_look(shortest, longest):
    # two chunks of 32 after 60 s behind other jobs: counted from the first look, its rate would be a fifth of
    # the real one and its end would be looked for up to `longest` late
    finished_at, end = chunked_job(64, 32, 0.5, start=60.0)
    looks, seen, waits = look_until_done(PollPacer(shortest, longest), finished_at, 64, start=60.0)
    assert end <= seen <= end + shortest + 0.1 * longest  # the start is seen up to a wait late


def test_a_pacer_with_a_longest_wait_below_its_shortest_is_refused():
    with pytest.raises(ValueError, match="shortest <= longest"):
        PollPacer(1.0, 0.5)


@contextlib.contextmanager
def job_api(answer):
    """A real loopback server playing the API's GET /v1/jobs/<id>: each look
    is answered with ``answer()``; yields a Client of it."""

    class Job(BaseHTTPRequestHandler):
        def do_GET(self):
            payload = json.dumps(answer()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Job)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Client(f"http://127.0.0.1:{server.server_address[1]}", "key")
    finally:
        server.shutdown()
        server.server_close()


def test_wait_returns_the_finished_job_after_looking_at_it_less_often_than_every_poll():
    """A job of 60 images queued for a second, then 10 finishing every 0.25 s
    (the answers' counts and total)."""
    started = time.monotonic()
    seen = []

    def answer():
        elapsed = time.monotonic() - started
        finished = min(60, 10 * max(0, int((elapsed - 1.0) / 0.25)))
        busy = 10 if elapsed >= 1.0 and finished < 60 else 0  # the chunk being processed
        seen.append(elapsed)
        return {"job_id": "j1", "status": "done" if finished == 60 else "processing" if elapsed >= 1.0 else "queued",
                "total": 60, "counts": {"queued": 60 - finished - busy, "processing": busy,
                                        "done": max(0, finished - 2), "failed": min(2, finished), "cancelled": 0}}

    looked = []
    with job_api(answer) as client:
        job = client.wait("j1", timeout=30, poll=0.01, max_poll=0.5, on_poll=looked.append)
    assert job["status"] == "done" and job["counts"]["failed"] == 2
    assert len(looked) == len(seen) and looked[-1] is job
    assert len(seen) < (2.5 / 0.01) / 2  # every 0.01 s would be 250 looks until the end at 2.5 s
    assert seen[-1] - 2.5 < 0.5  # seen done soon after it was


def test_wait_gives_up_at_its_timeout_though_the_job_is_paced_for_a_longer_wait():
    """The job moves an image a look out of 1,000, so the pacer asks for waits
    of seconds; the timeout still ends the wait within a poll of it."""
    looks = []

    def answer():
        looks.append(time.monotonic())
        return {"job_id": "j1", "status": "processing", "total": 1000,
                "counts": {"queued": 999 - len(looks), "processing": 1, "done": len(looks), "failed": 0, "cancelled": 0}}

    with job_api(answer) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="j1 still processing"):
            client.wait("j1", timeout=1.0, poll=0.05, max_poll=30.0)
        waited = time.monotonic() - started
    assert max(b - a for a, b in zip(looks, looks[1:])) > 0.3  # paced: the waits had grown past the poll
    assert 1.0 <= waited < 1.0 + 0.05 + 0.5  # yet it stopped within a poll (and a look) of the timeout
