"""The chaos report: every fault scenario, end to end, against real services.

    python -m bench.chaos                    # all scenarios, default sizes
    python -m bench.chaos --images 64        # bigger batches
    python -m bench.chaos --only worker-killed,postgres-restarted

Each scenario starts its own system (the API, real Celery worker processes,
the reconciler process) on a private Redis, a fresh PostgreSQL database (a
private cluster where the scenario restarts PostgreSQL), submits a batch of
synthetic radiographs over HTTP, breaks something mid-batch, waits for the
batch to finish and audits the database and the blob store
(bench/services.py `audit`). It prints one row per scenario:

    scenario, submitted, done, failed, duplicates, lost, seconds

(seconds: from the first submission to the batch's end, start-up excluded)

and last `chaos: <n> scenarios, lost=<n>, duplicates=<n>`. The exit status is
non-zero when anything was lost or duplicated, or a scenario broke.
tests/faults/ runs the same scenario functions with small batches and
asserts on what they observed.

Scenarios (the fault, and what must hold):

- worker-killed: SIGKILL of a worker holding a chunk; its images are re-run
  after their lease runs out and end `done` once.
- redis-restarted / redis-flushed: the broker loses every queued task
  mid-batch; the reconciler re-enqueues what the database says is unfinished.
- postgres-restarted: the database goes away mid-batch; the API answers
  503 JSON meanwhile, workers retry with backoff, the batch completes.
- api-killed-mid-upload: SIGKILL of the API while a large upload is in
  flight (while its body arrives, and while its files are being stored):
  no job is visible with missing files; the orphan blobs are purged; the
  client's retry with the same Idempotency-Key completes the batch.
- idempotent-resubmit: the same submission sent again (and four times at
  once) with one Idempotency-Key returns one job.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.services import (
    PrivatePostgres,
    PrivateRedis,
    SharedPostgresDatabases,
    System,
    audit,
    incomplete_jobs,
    radiographs,
    start_system,
    wait_for,
)
from bonedetect.client import encode_multipart

FAST = {"LEASE_S": "3", "DB_RETRY_S": "120"}  # short leases: a dead worker's chunk comes back in seconds
RECONCILER = (1.0, 2.0)  # interval, grace (s): the production defaults are 30 and 60


@dataclass
class Env:
    """Where a scenario runs: a work folder and a maker of fresh, empty databases."""

    workdir: Path
    database: Callable[[], str]


@dataclass
class Result:
    scenario: str
    submitted: int = 0
    done: int = 0
    failed: int = 0
    duplicates: int = 0
    lost: int = 0
    seconds: float = 0.0
    observed: dict = field(default_factory=dict)  # what the scenario saw on the way (tests assert on it)
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    def take(self, a) -> Result:
        self.submitted, self.done, self.failed = a.submitted, a.done, a.failed
        self.duplicates, self.lost = a.duplicates, a.lost
        self.problems += a.problems
        self.observed.update(rerun=a.rerun, stray_temp_files=a.stray_temp_files, unfinished=a.unfinished)
        return self


def _count(system: System, job_id: str, *statuses: str) -> int:
    from sqlalchemy import func, select

    from db.models import Image

    with system.sessions() as session:
        return session.scalar(
            select(func.count()).select_from(Image).where(Image.job_id == job_id, Image.status.in_(statuses))
        )


def _finish(system: System, job_id: str, timeout: float = 240) -> dict:
    return system.client().wait(job_id, timeout=timeout, poll=0.25)


# -- scenarios --------------------------------------------------------------------------


def worker_killed(env: Env, images: int = 32, concurrency: int = 1) -> Result:
    """SIGKILL one of two workers while it holds a chunk (``concurrency``: WORKER_CONCURRENCY, chunks each
    worker holds at once)."""
    result = Result("worker-killed" if concurrency == 1 else f"worker-killed ({concurrency} chunks at once)")
    with PrivateRedis(env.workdir / "redis") as redis:
        system = start_system(env.workdir, env.database(), redis.url, workers=2,
                              env={**FAST, "WORKER_CONCURRENCY": str(concurrency)}, reconciler=RECONCILER)
        try:
            system.wait_workers_ready()
            files = radiographs(images, seed=101, size=(300, 600))
            t0 = time.monotonic()
            job_id = system.client().submit(files, label="chaos: worker killed")["job_id"]
            chunk = system.settings.chunk_size
            # Both workers hold a chunk when more than one worker's worth of chunks is processing.
            wait_for(lambda: _count(system, job_id, "processing") > chunk * concurrency, 60, "both workers to hold a chunk",
                     0.01)
            result.observed["killed_pid"] = system.kill_worker(0)
            result.observed["processing_at_kill"] = _count(system, job_id, "processing")
            final = _finish(system, job_id)
            result.seconds = time.monotonic() - t0
            result.observed["status"] = final["status"]
            return result.take(audit(system, [job_id], len(files)))
        finally:
            system.stop()


def redis_lost(env: Env, images: int = 40, how: str = "restart") -> Result:
    """Restart (empty) or flush the broker while most of the batch still waits in it."""
    result = Result(f"redis-{'restarted' if how == 'restart' else 'flushed'}")
    with PrivateRedis(env.workdir / "redis") as redis:
        system = start_system(env.workdir, env.database(), redis.url, workers=1, env=FAST, reconciler=RECONCILER)
        try:
            system.wait_workers_ready()
            files = radiographs(images, seed=202, size=(300, 600))
            t0 = time.monotonic()
            job_id = system.client().submit(files, label=f"chaos: redis {how}")["job_id"]
            queue = system.settings.queue_name
            wait_for(lambda: _count(system, job_id, "done") >= 1, 60, "the first images to finish", 0.02)
            # Hold the reconciler still for the moment of the fault, so that what it re-sends
            # cannot be taken for what Redis kept; it runs on right after.
            os.kill(system.reconciler.pid, signal.SIGSTOP)
            try:
                result.observed["waiting_before"] = redis.queue_length(queue)
                if how == "restart":
                    redis.restart()
                else:
                    redis.flush()
                result.observed["waiting_after"] = redis.queue_length(queue)
                result.observed["unfinished_at_fault"] = _count(system, job_id, "queued", "processing")
            finally:
                os.kill(system.reconciler.pid, signal.SIGCONT)
            final = _finish(system, job_id)
            result.seconds = time.monotonic() - t0
            result.observed["status"] = final["status"]
            return result.take(audit(system, [job_id], len(files)))
        finally:
            system.stop()


def _http(method: str, url: str, key: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 15):
    """(status, headers, body) of one request; errors are answers too."""
    req = urllib.request.Request(
        url, data=body, method=method, headers={"Authorization": f"Bearer {key}", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def postgres_restarted(env: Env, images: int = 40, down_s: float = 4.0) -> Result:
    """Stop PostgreSQL mid-batch for `down_s` seconds, then start it again."""
    result = Result("postgres-restarted")
    pg = PrivatePostgres()
    try:
        pg.start()
        database_url = pg.create_database()
        with PrivateRedis(env.workdir / "redis") as redis:
            system = start_system(env.workdir, database_url, redis.url, workers=1, env=FAST, reconciler=RECONCILER)
            try:
                system.wait_workers_ready()
                files = radiographs(images, seed=303, size=(700, 1000), distinct=6)  # large: a chunk takes a while
                key = system.keys["a"]
                t0 = time.monotonic()
                job_id = system.client().submit(files, label="chaos: postgres restart")["job_id"]
                wait_for(lambda: _count(system, job_id, "done") >= 1, 60, "the first images to finish", 0.01)
                # Stop it while a chunk is in flight, so that the worker's result write meets the outage.
                wait_for(lambda: _count(system, job_id, "processing"), 60, "a chunk in flight", 0.005)
                pg.stop("fast")
                down_at = time.monotonic()
                answers = []
                body, ctype = encode_multipart([], [("files", n, d) for n, d in files[:1]])
                while time.monotonic() - down_at < down_s:
                    for method, path, data, headers in (
                        ("GET", f"/v1/jobs/{job_id}", None, {}),
                        ("GET", f"/v1/jobs/{job_id}/images", None, {}),
                        ("POST", "/v1/jobs", body, {"Content-Type": ctype}),
                        ("GET", "/readyz", None, {}),
                    ):
                        status, hdrs, raw = _http(method, system.api_url + path, key, data, headers)
                        try:
                            parsed = json.loads(raw)
                        except ValueError:
                            parsed = None
                        answer = {"request": f"{method} {path.replace(job_id, '<job>')}", "status": status,
                                  "json": parsed, "retry_after": hdrs.get("Retry-After")}  # fmt: skip
                        if answer not in answers:
                            answers.append(answer)
                    time.sleep(0.5)
                pg.start()
                result.observed["down_s"] = round(time.monotonic() - down_at, 1)
                result.observed["outage_answers"] = answers
                final = _finish(system, job_id)
                result.seconds = time.monotonic() - t0
                result.observed["status"] = final["status"]
                logs = system.worker_logs()
                result.observed["worker_retries"] = {
                    "claim": logs.count("claim: database unavailable"),
                    "write results": logs.count("write results: database unavailable"),
                }
                result.observed["jobs"] = len(system.client().get_json("/v1/jobs")["jobs"])
                return result.take(audit(system, [job_id], len(files)))
            finally:
                system.stop()
    finally:
        pg.destroy()


def _send_raw(port: int, key: str, body: bytes, ctype: str, idempotency_key: str, upto: int) -> socket.socket:
    """Start a POST /v1/jobs and send the first `upto` bytes of its body; the socket stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nIdempotency-Key: {idempotency_key}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:upto])
    return sock


def _job_folders(system: System) -> list[Path]:
    return [p for p in system.blob_root.glob("tenants/*/jobs/*") if p.is_dir()]


def api_killed_mid_upload(env: Env, images: int = 12) -> Result:
    """SIGKILL the API (gunicorn, every process) while an upload of ~1 MB files is in flight."""
    from db.retention import orphan_folders, purge_orphan_blobs

    result = Result("api-killed-mid-upload")
    with PrivateRedis(env.workdir / "redis") as redis:
        system = start_system(
            env.workdir, env.database(), redis.url, workers=1, env=FAST, reconciler=RECONCILER, api_process=True
        )
        try:
            files = radiographs(images, seed=404, size=(600, 800), fmt="PNG16", distinct=4)
            body, ctype = encode_multipart([("label", "chaos: api killed")], [("files", n, d) for n, d in files])
            key, idem = system.keys["a"], f"upload-{uuid.uuid4()}"
            result.observed["upload_bytes"] = len(body)
            t0 = time.monotonic()

            # 1. Killed while the body arrives.
            sock = _send_raw(system.api.port, key, body, ctype, idem, upto=len(body) // 2)
            time.sleep(0.3)
            system.api.kill()
            sock.close()
            result.observed["mid_body"] = {
                "incomplete_jobs": incomplete_jobs(system),
                "job_folders": len(_job_folders(system)),
            }

            # 2. Killed while the files are being copied to the blob store (before the commit).
            system.api.start()
            sock = _send_raw(system.api.port, key, body, ctype, idem, upto=len(body))
            wait_for(lambda: _job_folders(system), 60, "the API to store the first file", interval=0.001)
            system.api.kill()
            sock.close()
            with system.sessions() as session:
                from sqlalchemy import func, select

                from db.models import Job

                committed = session.scalar(select(func.count()).select_from(Job))
            orphans = orphan_folders(system.sessions, system.blobs(), older_than_hours=0)
            result.observed["mid_store"] = {
                "incomplete_jobs": incomplete_jobs(system),
                "committed_jobs": committed,
                "orphan_folders": len(orphans),
            }
            result.observed["orphans_purged"] = purge_orphan_blobs(system.sessions, system.blobs(), older_than_hours=0)
            result.observed["orphans_left"] = len(orphan_folders(system.sessions, system.blobs(), older_than_hours=0))

            # 3. The client retries with the same Idempotency-Key once the API is back.
            system.api.start()
            status, _, raw = _http(
                "POST",
                system.api_url + "/v1/jobs",
                key,
                body,
                {"Content-Type": ctype, "Idempotency-Key": idem},
                timeout=120,
            )
            result.observed["retry_status"] = status
            job_id = json.loads(raw)["job_id"]
            final = _finish(system, job_id)
            result.seconds = time.monotonic() - t0
            result.observed["status"] = final["status"]
            result.observed["jobs"] = len(system.client().get_json("/v1/jobs")["jobs"])
            result.observed["incomplete_jobs_at_end"] = incomplete_jobs(system)
            return result.take(audit(system, [job_id], len(files)))
        finally:
            system.stop()


def idempotent_resubmit(env: Env, images: int = 12) -> Result:
    """One submission sent twice in a row, another sent four times at once, each with one key."""
    result = Result("idempotent-resubmit")
    with PrivateRedis(env.workdir / "redis") as redis:
        system = start_system(env.workdir, env.database(), redis.url, workers=1, env=FAST, reconciler=RECONCILER)
        try:
            files = radiographs(images, seed=505)
            body, ctype = encode_multipart([], [("files", n, d) for n, d in files])
            key = system.keys["a"]
            t0 = time.monotonic()

            def send(idem: str):
                status, _, raw = _http(
                    "POST", system.api_url + "/v1/jobs", key, body, {"Content-Type": ctype, "Idempotency-Key": idem}, 60
                )
                return status, json.loads(raw)

            first, again = send("night-1"), send("night-1")
            result.observed["sequential"] = [(s, b["job_id"]) for s, b in (first, again)]
            answers: list = []
            threads = [threading.Thread(target=lambda: answers.append(send("night-2"))) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            result.observed["concurrent"] = sorted((s, b["job_id"]) for s, b in answers)
            job_ids = sorted({b["job_id"] for _, b in [first, again, *answers]})
            listed = [j["job_id"] for j in system.client().get_json("/v1/jobs")["jobs"]]
            result.observed["jobs_listed"] = len(listed)
            for job_id in job_ids:
                _finish(system, job_id)
            result.seconds = time.monotonic() - t0
            # Every job beyond one per key is a duplicate: audit them all against 2 submissions.
            return result.take(audit(system, listed, 2 * len(files)))
        finally:
            system.stop()


SCENARIOS: dict[str, Callable[..., Result]] = {
    "worker-killed": worker_killed,
    "worker-killed-2-chunks": lambda env, images: worker_killed(env, images, concurrency=2),
    "redis-restarted": lambda env, images: redis_lost(env, images, "restart"),
    "redis-flushed": lambda env, images: redis_lost(env, images, "flush"),
    "postgres-restarted": postgres_restarted,
    "api-killed-mid-upload": lambda env, images: api_killed_mid_upload(env, max(4, images // 3)),
    "idempotent-resubmit": lambda env, images: idempotent_resubmit(env, max(4, images // 3)),
}


# -- the report -------------------------------------------------------------------------

COLUMNS = ("scenario", "submitted", "done", "failed", "duplicates", "lost", "seconds")


def table(results: list[Result]) -> str:
    rows = [COLUMNS] + [
        (
            r.scenario,
            r.submitted,
            r.done,
            r.failed,
            r.duplicates,
            r.lost,
            f"{r.seconds:.1f}" if not r.error else "error",
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        cells = [str(v).ljust(widths[i]) if i == 0 else str(v).rjust(widths[i]) for i, v in enumerate(row)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48, help="images per batch (upload and idempotency: a third)")
    parser.add_argument("--only", help="comma-separated scenario names: " + ", ".join(SCENARIOS))
    parser.add_argument("--keep", action="store_true", help="keep the work folders (logs, blobs)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print what each scenario observed")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")

    root = Path(tempfile.mkdtemp(prefix="bonedetect-chaos-"))
    databases = SharedPostgresDatabases()
    results = []
    try:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            env = Env(root / name, databases.create)
            t0 = time.monotonic()
            try:
                r = SCENARIOS[name](env, args.images)
            except Exception as err:
                traceback.print_exc()
                r = Result(name, seconds=time.monotonic() - t0, error=f"{type(err).__name__}: {err}")
            results.append(r)
            if args.verbose:
                print(
                    json.dumps({"scenario": name, "observed": r.observed, "problems": r.problems}, default=str),
                    file=sys.stderr,
                )
    finally:
        databases.close()
        if args.keep:
            print(f"work folders kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(table(results))
    for r in results:
        for problem in r.problems[:5]:
            print(f"  {r.scenario}: {problem}")
        if r.error:
            print(f"  {r.scenario}: did not finish: {r.error}")
    lost, duplicates = sum(r.lost for r in results), sum(r.duplicates for r in results)
    print(f"chaos: {len(results)} scenarios, lost={lost}, duplicates={duplicates}")
    return 1 if lost or duplicates or any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
