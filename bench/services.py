"""Real services for the fault and load runs: private Redis and PostgreSQL
instances that a scenario may restart or empty, the system (API, worker
processes, reconciler process) on top of them, and the audit that counts
what a batch lost or duplicated.

Used by bench/chaos.py, bench/load.py and tests/faults/, so the chaos report
and the tests run the same code. Never touches the machine's shared Redis or
PostgreSQL beyond creating (and dropping) a database of its own.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonedetect.client import Client
from bonedetect.local import ApiServer, serve_api, settings_env, start_worker, stop_process
from bonedetect.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll until predicate() is truthy; returns its value, or raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


# -- Redis ------------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of our own on a free port, without persistence: a restart empties it."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory-policy", "noeviction", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: self._ping(), 15, f"redis-server on port {self.port}")
        return self

    def _ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # redis shuts down on SIGTERM; nothing is saved (--save "")
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_s: float = 0.5) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def flush(self) -> None:
        self.client().flushall()

    def queue_length(self, queue: str) -> int:
        return int(self.client().llen(queue))

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- PostgreSQL -----------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    path = found[-1] if found else shutil.which(name)
    if not path:
        raise RuntimeError(f"PostgreSQL's {name} is not installed")
    return path


def postgres_binaries_present() -> bool:
    try:
        _pg_bin("initdb"), _pg_bin("pg_ctl")
        return True
    except RuntimeError:
        return False


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb into a temp folder, its own port and
    socket folder), so a scenario may stop and restart it. PostgreSQL refuses to
    run as root: as root the cluster runs as the `postgres` user."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bd-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as = []
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._initialised = False

    def _run(self, *argv: str, timeout: float = 60) -> None:
        result = subprocess.run([*self._as, *argv], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> PrivatePostgres:
        if not self._initialised:
            self._run(
                _pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
            )
            self._initialised = True
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """fast: the server closes every connection at once, as in a restart or a failover."""
        if self.running():
            self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return self._initialised and (self.data / "postmaster.pid").exists()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str = "bonedetect") -> str:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.destroy()


class SharedPostgresDatabases:
    """Fresh databases on the machine's PostgreSQL (created here, dropped by close())."""

    def __init__(self, admin_url: str = PG_ADMIN):
        self.admin_url = admin_url
        self.names: list[str] = []

    def create(self) -> str:
        from sqlalchemy import create_engine, text

        name = f"bd_chaos_{uuid.uuid4().hex[:12]}"
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        self.names.append(name)
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"

    def close(self) -> None:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in self.names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        self.names.clear()


# -- test radiographs ---------------------------------------------------------------------


def radiographs(
    n: int, seed: int, size: tuple[int, int] = (200, 520), fmt: str = "JPEG", distinct: int | None = None
) -> list[tuple[str, bytes]]:
    """n synthetic radiographs with drawn lesions, as (filename, bytes); fmt JPEG, PNG or PNG16.
    With `distinct`, only that many are drawn (large ones take a while) and repeated under new names."""
    from PIL import Image

    from training.synthetic import synthetic_radiograph

    rng = np.random.default_rng(seed)
    files: list[tuple[str, bytes]] = []
    ext = "jpg" if fmt == "JPEG" else "png"
    for i in range(n):
        if distinct is not None and i >= distinct:
            files.append((f"rad-{seed}-{i:04d}.{ext}", files[i % distinct][1]))
            continue
        h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
        image, _mask, _ = synthetic_radiograph(rng, h, w)
        buf = io.BytesIO()
        if fmt == "JPEG":
            Image.fromarray(image).save(buf, format="JPEG", quality=92)
        elif fmt == "PNG16":
            noise = rng.integers(0, 256, image.shape, dtype=np.uint16)  # 16-bit detail: a large, honest file
            Image.fromarray((image.astype(np.uint16) << 8) | noise).save(buf, format="PNG")
        else:
            Image.fromarray(image).save(buf, format="PNG")
        files.append((f"rad-{seed}-{i:04d}.{ext}", buf.getvalue()))
    return files


# -- the system ---------------------------------------------------------------------------


class ApiProcess:
    """The API under gunicorn, as deployed, in its own process group so that a
    scenario can SIGKILL all of it at once."""

    def __init__(self, settings: Settings, log_path: Path, workers: int = 1, threads: int = 4, **env: str):
        self.settings, self.log_path, self.workers, self.threads, self.env = settings, log_path, workers, threads, env
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        argv = [
            sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}",
            "--workers", str(self.workers), "--threads", str(self.threads),
            "--graceful-timeout", "2", "--timeout", "120", "api:create_app()",
        ]  # fmt: skip
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            argv,
            env=settings_env(self.settings, **self.env),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited with {self.proc.returncode}: see {self.log_path}")
            return port_open(self.port)

        wait_for(up, 60, "the API to listen")
        return self

    def kill(self) -> None:
        """SIGKILL the gunicorn master and its workers: no shutdown handler runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            # The master is gone, but its workers (same group) may still be dying with the listening socket
            # open: a start() now would take their port for the new API's, and its first request be reset.
            wait_for(lambda: not port_open(self.port), 10, f"the killed API to let go of port {self.port}")
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@dataclass
class System:
    settings: Settings
    workdir: Path
    keys: dict[str, str]
    env: dict[str, str]
    api: ApiServer | ApiProcess
    workers: list[subprocess.Popen] = field(default_factory=list)
    reconciler: subprocess.Popen | None = None
    _engine: object = None

    @property
    def api_url(self) -> str:
        return self.api.url

    def client(self, tenant: str = "a", timeout: float = 60.0) -> Client:
        return Client(self.api_url, self.keys[tenant], timeout=timeout)

    @property
    def sessions(self):
        from db.session import make_engine, make_sessionmaker

        if self._engine is None:
            self._engine = make_engine(self.settings.database_url)
        return make_sessionmaker(self._engine)

    @property
    def blob_root(self) -> Path:
        return self.workdir / "blobs"

    def blobs(self):
        from db.blobstore import open_blob_store

        return open_blob_store(self.settings.blob_url)

    def add_worker(self) -> subprocess.Popen:
        i = len(self.workers)
        proc = start_worker(
            self.settings, name=f"w{i}-{uuid.uuid4().hex[:6]}", log_path=self.workdir / f"worker{i}.log", **self.env
        )
        self.workers.append(proc)
        return proc

    def wait_workers_ready(self, timeout: float = 90) -> None:
        """Until every worker's log says it is ready (its model loaded)."""

        def ready() -> bool:
            for i, proc in enumerate(self.workers):
                if proc.poll() is not None:
                    continue
                log = self.workdir / f"worker{i}.log"
                if not (log.exists() and b"ready" in log.read_bytes()):
                    return False
            return True

        wait_for(ready, timeout, "the workers to be ready", interval=0.2)

    def kill_worker(self, i: int) -> int:
        proc = self.workers[i]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.pid

    def start_reconciler(self, interval: float, grace: float) -> None:
        argv = [
            sys.executable,
            "-m",
            "bonedetect.cli",
            "reconciler",
            "--interval",
            str(interval),
            "--grace",
            str(grace),
        ]
        out = open(self.workdir / "reconciler.log", "ab")
        self.reconciler = subprocess.Popen(
            argv, env=settings_env(self.settings, **self.env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()

    def worker_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("worker*.log")))

    def stop(self) -> None:
        procs = [p for p in [*self.workers, self.reconciler] if p is not None and p.poll() is None]
        for proc in procs:  # all at once: a worker's warm shutdown takes a couple of seconds
            proc.terminate()
        for proc in procs:
            stop_process(proc)
        self.api.stop()
        if self._engine is not None:
            self._engine.dispose()


def start_system(
    workdir: Path,
    database_url: str,
    broker_url: str,
    *,
    tenants=("a",),
    workers: int = 1,
    env: dict[str, str] | None = None,
    api_process: bool = False,
    reconciler: tuple[float, float] | None = None,
) -> System:
    """Migrate, create tenants, start the API (a thread, or gunicorn with api_process),
    `workers` Celery worker processes and, with reconciler=(interval, grace), the
    reconciler process. `env` overrides settings (LEASE_S, CHUNK_SIZE ...) for every part."""
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker
    from db.tenants import create_tenant

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        "CHUNK_SIZE": "4",
        "INFER_BATCH_SIZE": "4",
        "TORCH_THREADS": "1",
        "IO_THREADS": "2",
        "LOG_FORMAT": "text",
        **(env or {}),
    }
    settings = Settings.from_env(
        {
            **os.environ,
            **env,
            "BONEDETECT_HOME": str(workdir / "var"),
            "DATABASE_URL": database_url,
            "BROKER_URL": broker_url,
            "BLOB_URL": f"file://{workdir / 'blobs'}",
            "QUEUE_NAME": f"segment-chaos-{uuid.uuid4().hex[:8]}",
        }
    )
    settings.ensure_home()
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine).begin() as session:
        keys = {name: create_tenant(session, f"hospital-{name}-{uuid.uuid4().hex[:6]}")[1] for name in tenants}
    engine.dispose()
    api = ApiProcess(settings, workdir / "api.log", **env).start() if api_process else serve_api(settings)
    system = System(settings, workdir, keys, env, api)
    try:
        for _ in range(workers):
            system.add_worker()
        if reconciler:
            system.start_reconciler(*reconciler)
    except BaseException:
        system.stop()
        raise
    return system


# -- the audit ----------------------------------------------------------------------------

RESULT_FILES = {"source", "mask.png", "overlay.png", "seg.dcm"}


@dataclass
class Audit:
    """What a batch came to, counted from the database and the blob store."""

    submitted: int
    rows: int = 0
    done: int = 0
    failed: int = 0
    unfinished: int = 0  # still queued or processing
    duplicates: int = 0  # extra rows, extra result files, results not from one run
    lost: int = 0  # files with no final row, or a done row whose mask or overlay is gone
    rerun: int = 0  # images claimed more than once (a rerun, not a duplicate)
    stray_temp_files: int = 0  # half-written files a killed process left (never read)
    problems: list[str] = field(default_factory=list)


def audit(system: System, job_ids: list[str], submitted: int) -> Audit:
    """Count done, failed, lost and duplicated images of these jobs, looking at the
    rows, and at every image's folder in the blob store."""
    from PIL import Image as PILImage
    from sqlalchemy import select

    from db.blobstore import image_prefix
    from db.models import DONE, FAILED, PROCESSING, QUEUED, Image

    result = Audit(submitted=submitted)
    with system.sessions() as session:
        rows = session.scalars(
            select(Image).where(Image.job_id.in_(job_ids)).order_by(Image.job_id, Image.position)
        ).all()
    result.rows = len(rows)
    if len(rows) > submitted:
        result.duplicates += len(rows) - submitted
        result.problems.append(f"{len(rows)} image rows for {submitted} submitted files")
    positions = [(r.job_id, r.position) for r in rows]
    if len(set(positions)) != len(positions):
        result.duplicates += len(positions) - len(set(positions))
        result.problems.append("two rows for one file")
    for r in rows:
        folder = system.blob_root / image_prefix(r.tenant_id, r.job_id, r.id)
        names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        temps = [n for n in names if n.startswith(".")]
        extra = [n for n in names if not n.startswith(".") and n not in RESULT_FILES]
        result.stray_temp_files += len(temps)
        if extra:
            result.duplicates += len(extra)
            result.problems.append(f"image {r.id}: unexpected files {extra}")
        if r.attempts > 1:
            result.rerun += 1
        if r.status == DONE:
            result.done += 1
            # the overlay is there (OVERLAYS=eager, or already asked for), or can be made from the upload (lazy)
            if "mask.png" not in names or ("overlay.png" not in names and "source" not in names):
                result.lost += 1
                result.problems.append(f"image {r.id} is done but its mask, or what its overlay is made from, is missing")
                continue
            mask = np.asarray(PILImage.open(folder / "mask.png"))
            if mask.shape != (r.height, r.width) or int((mask > 0).sum()) != r.area_px:
                result.duplicates += 1
                result.problems.append(f"image {r.id}: mask and statistics are not from one run")
        elif r.status == FAILED:
            result.failed += 1
        elif r.status in (QUEUED, PROCESSING):
            result.unfinished += 1
            if r.blob_key and "source" not in names:
                result.problems.append(f"image {r.id} is {r.status} but its file is missing")
    result.lost += max(0, submitted - result.done - result.failed)
    if result.unfinished:
        result.problems.append(f"{result.unfinished} images still queued or processing")
    return result


def incomplete_jobs(system: System) -> list[str]:
    """Jobs visible to clients whose files are not all there: rows missing, or a
    queued or done image whose source blob is gone. Must always be empty."""
    from sqlalchemy import func, select

    from db.models import Image, Job

    bad = []
    blobs = system.blobs()
    with system.sessions() as session:
        for job in session.scalars(select(Job)).all():
            n = session.scalar(select(func.count()).select_from(Image).where(Image.job_id == job.id))
            if n != job.image_count:
                bad.append(f"job {job.id}: {n} rows for {job.image_count} files")
                continue
            for key in session.scalars(
                select(Image.blob_key).where(Image.job_id == job.id, Image.blob_key.is_not(None))
            ):
                if not blobs.exists(key):
                    bad.append(f"job {job.id}: file {key} missing")
                    break
    return bad
