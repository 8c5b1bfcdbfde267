"""A bounded load test on loopback: clients polling job status while a batch runs.

    python -m bench.load                      # 500 images, 50 clients, 200 requests/s, 60 s
    python -m bench.load --duration 20 --images 200

Starts the API under gunicorn as deployed (docker-compose.yml: 4 workers x 4
threads), real Celery worker processes and the reconciler, on a fresh
database of the machine's PostgreSQL and a private Redis. Submits one batch
over HTTP, then `--clients` threads, each on its own keep-alive connection,
poll `GET /v1/jobs/<id>` on a fixed schedule (together `--rate` requests/s)
for `--duration` seconds while the batch runs. Prints the status endpoint's
latency (p50/p90/p99/max, measured from the moment a request was sent and,
so that a stalled server cannot hide, from the moment it was due), its error
rate, the achieved rate, how far the batch got, and, once the batch has
finished, the audit: nothing lost, nothing duplicated.

Everything shares this machine's CPUs: the load generator, the API and the
workers compete, so the numbers are for comparing runs on one machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.services import PrivateRedis, SharedPostgresDatabases, audit, radiographs, start_system


@dataclass
class Sample:
    due: float  # when the request was scheduled
    sent: float
    done: float
    ok: bool
    status: int | None


def poller(port: int, path: str, key: str, first: float, interval: float, end: float, out: list[Sample]) -> None:
    """One client: a keep-alive connection, one request every `interval` seconds."""
    headers = {"Authorization": f"Bearer {key}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    due = first
    while due < end:
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        sent = time.perf_counter()
        status, ok = None, False
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            status = resp.status
            ok = status == 200 and "status" in json.loads(body)
        except Exception:
            conn.close()  # reconnect on the next request
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        out.append(Sample(due, sent, time.perf_counter(), ok, status))
        due += interval
    conn.close()


def percentiles(values_s: np.ndarray) -> dict:
    ms = values_s * 1000.0
    return {p: float(np.percentile(ms, q)) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))} | {
        "max": float(ms.max())
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=float, default=200.0, help="status requests per second, all clients together")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of polling")
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes")
    parser.add_argument("--api-workers", type=int, default=4)
    parser.add_argument("--api-threads", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="CPU threads per worker (0: all cores, starving the API)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, blobs)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bonedetect-load-"))
    databases = SharedPostgresDatabases()
    redis = PrivateRedis(root / "redis").start()
    system = None
    try:
        # 50 distinct radiographs, each sent several times under its own name: made quickly, processed as 500.
        pool = radiographs(min(50, args.images), seed=7, size=(400, 700))
        files = [(f"load-{i:04d}.jpg", pool[i % len(pool)][1]) for i in range(args.images)]
        env = {
            "CHUNK_SIZE": str(args.chunk_size),
            "INFER_BATCH_SIZE": "8",
            "TORCH_THREADS": str(args.torch_threads),
            "IO_THREADS": "2",
        }
        system = start_system(
            root, databases.create(), redis.url, workers=args.workers, env=env, api_process=True, reconciler=(5.0, 30.0)
        )
        system.api.stop()  # restart it with the deployed shape
        system.api.workers, system.api.threads = args.api_workers, args.api_threads
        system.api.start()
        system.wait_workers_ready()

        client = system.client(timeout=300)
        t_submit = time.perf_counter()
        job_id = client.submit(files, label="load test")["job_id"]
        submitted_s = time.perf_counter() - t_submit

        start = time.perf_counter() + 0.5
        end = start + args.duration
        interval = args.clients / args.rate  # seconds between one client's requests
        samples: list[list[Sample]] = [[] for _ in range(args.clients)]
        threads = [
            threading.Thread(
                target=poller,
                args=(
                    system.api.port,
                    f"/v1/jobs/{job_id}",
                    system.keys["a"],
                    start + i * interval / args.clients,
                    interval,
                    end,
                    samples[i],
                ),
                daemon=True,
            )
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        at_end = client.job(job_id)
        final = client.wait(job_id, timeout=3600, poll=1.0, max_poll=1.0)  # batch_s to the second, as before
        batch_s = time.perf_counter() - t_submit
        report = audit(system, [job_id], len(files))

        flat = [s for per in samples for s in per]
        sent = np.array([s.done - s.sent for s in flat])
        due = np.array([s.done - s.due for s in flat])
        errors = sum(not s.ok for s in flat)
        statuses = sorted({s.status for s in flat if not s.ok and s.status is not None})
        lat, late = percentiles(sent), percentiles(due)
        cores = os.cpu_count()
        print(f"load: {args.images}-image batch, {args.clients} clients polling GET /v1/jobs/<id> at {args.rate:g} req/s "
              f"for {args.duration:g} s (API: gunicorn {args.api_workers} workers x {args.api_threads} threads; "
              f"{args.workers} Celery worker(s); {cores} CPU cores, shared with the load generator)")  # fmt: skip
        print(f"requests      {len(flat)} ({len(flat) / args.duration:.1f}/s achieved)")
        print("latency ms    " + "  ".join(f"{k} {v:.1f}" for k, v in lat.items()))
        print("  from due    " + "  ".join(f"{k} {v:.1f}" for k, v in late.items()))
        print(
            f"errors        {errors} ({100.0 * errors / max(1, len(flat)):.2f} %)"
            + (f" statuses {statuses}" if statuses else "")
        )
        print(f"batch         upload {submitted_s:.1f} s; at the end of the window {at_end['status']} "
              f"{100 * at_end['progress']:.0f} %; {final['status']} after {batch_s:.1f} s ({args.images / batch_s:.1f} images/s)")  # fmt: skip
        print(f"audit         submitted {report.submitted}, done {report.done}, failed {report.failed}, "
              f"lost {report.lost}, duplicates {report.duplicates}")  # fmt: skip
        return 0 if errors == 0 and report.lost == 0 and report.duplicates == 0 else 1
    finally:
        if system is not None:
            system.stop()
        redis.stop()
        databases.close()
        if args.keep:
            print(f"work folder kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
