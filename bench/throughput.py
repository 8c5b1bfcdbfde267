"""Throughput of the three layers, measured the way they run.

- model: ``Segmenter.forward`` on preprocessed frames (the network alone, with
  the worker's thread count and forward batch);
- pipeline: ``worker.pipeline.Pipeline.run`` over chunks of JPEG files read
  from disk, in one process (decode -> preprocess -> network -> restore,
  postprocess, statistics -> mask PNG, and the overlay PNG when overlays are
  eager): the worker's own code;
- system: an HTTP upload to the real API (``bonedetect.local.serve_api``),
  the broker, real Celery worker processes (``start_worker``) and the
  statistics committed to the database, from the first byte uploaded until
  the API reports the job done.

Plus a per-step cost breakdown (single thread) and memory probes for the
worker (RSS over a long run) and the API (peak RSS against upload size).
``python -m bench`` (bench/__main__.py) is the command; docs/benchmarks.md
has the numbers.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

JPEG_QUALITY = 92


# -- test images -------------------------------------------------------------------------


def radiograph_jpeg(seed: int, height: int, width: int) -> bytes:
    """One synthetic radiograph (training.synthetic) as a JPEG of height x width.

    Drawn at a fifth of the size and upscaled (drawing at full size takes
    seconds), with a fine film grain added so the JPEG is as large as a real
    radiograph's (about 0.8 MB at 3000x2500, not the 0.3 MB of a smooth upscale).
    """
    from training.synthetic import synthetic_radiograph

    rng = np.random.default_rng(seed)
    small_h, small_w = max(64, height // 5), max(64, width // 5)
    image, _, _ = synthetic_radiograph(rng, small_h, small_w)
    big = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    grain = cv2.GaussianBlur(rng.normal(0.0, 6.0, big.shape).astype(np.float32), (0, 0), 1.2)
    big = np.clip(big + grain, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return buf.tobytes()


def bench_images(cache: Path, n: int, height: int, width: int, unique: int = 200, log=None) -> list[Path]:
    """n JPEG paths of height x width, made once and cached under ``cache``;
    beyond ``unique`` different images the list repeats them."""
    folder = Path(cache) / f"jpeg-{height}x{width}"
    folder.mkdir(parents=True, exist_ok=True)
    distinct = [folder / f"img-{i:04d}.jpg" for i in range(min(n, unique))]
    missing = [p for p in distinct if not p.exists()]
    if missing and log:
        log(f"making {len(missing)} synthetic {height}x{width} JPEGs in {folder} (once)")
    if len(missing) > 1 and (os.cpu_count() or 1) > 1:
        # one process per core: about 0.4-0.8 s each at 3000x2500, mostly single-threaded numpy;
        # spawned, not forked, since the caller may already run torch's threads
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(len(missing), os.cpu_count() or 1), mp_context=spawn) as pool:
            list(pool.map(_write_jpeg, missing, [height] * len(missing), [width] * len(missing)))
    else:
        for path in missing:
            _write_jpeg(path, height, width)
    return [distinct[i % len(distinct)] for i in range(n)]


def _write_jpeg(path: Path, height: int, width: int) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(radiograph_jpeg(int(path.stem.split("-")[1]), height, width))
    tmp.replace(path)


# -- the model ---------------------------------------------------------------------------


FULL_SIZE_WEIGHTS = ("random", "shipped")


def full_size_checkpoint(path: Path, size: int = 512, seed: int = 0, weights: str = "random") -> Path:
    """The thesis network (``UNetConfig()``, 7.85 M parameters) as a
    checkpoint for speed measurements only (no trained full-size checkpoint
    exists yet), with

    - ``weights="random"``: random weights. The output bias is set so that
      about 2% of a synthetic radiograph's frame is above the threshold, like
      a tumor, rather than half of it. The marked pixels are specks spread
      over the whole image, the worst case for restoring and postprocessing
      (every step works on the whole image, thousands of regions).
    - ``weights="shipped"``: the shipped model's trained network carried in
      the full-size one (``widen_network``): the same cost per forward pass,
      and the masks of a trained network (a few solid regions, larger than
      at the shipped model's own 256 px since it sees the image twice as
      large). For what finishing costs on a trained network's masks; not
      for Dice (it was never validated at 512).
    """
    import torch

    from model.checkpoint import save_checkpoint
    from model.network import AttentionUNet, UNetConfig
    from model.postprocess import Postprocessor
    from model.preprocess import Preprocessor

    if weights not in FULL_SIZE_WEIGHTS:
        raise ValueError(f"weights must be one of {FULL_SIZE_WEIGHTS}, got {weights!r}")
    if weights == "shipped":
        from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint

        shipped = load_checkpoint(DEFAULT_CHECKPOINT)
        return save_checkpoint(
            path,
            widen_network(shipped.network, UNetConfig(dropout=shipped.network.config.dropout)),
            preprocessor=Preprocessor(size, mean=shipped.preprocessor.mean, std=shipped.preprocessor.std),
            postprocessor=shipped.postprocessor,  # served plain: its TTA thresholds were chosen at 256
            version="bench-full-size-shipped",
            label=f"{shipped.version} carried in the full-size network, for speed measurements only",
        )
    torch.manual_seed(seed)
    network = AttentionUNet(UNetConfig()).eval()
    preprocessor = Preprocessor(size, mean=0.22, std=0.22)
    frame, _ = preprocessor(cv2.imdecode(np.frombuffer(radiograph_jpeg(seed, size, size), np.uint8), cv2.IMREAD_GRAYSCALE))
    with torch.inference_mode():
        logits = network(torch.from_numpy(frame)[None, None])
        network.head.bias -= float(torch.quantile(logits.flatten()[::7], 0.98))  # 98th percentile -> logit 0 (p = 0.5)
    return save_checkpoint(
        path,
        network,
        preprocessor=preprocessor,
        postprocessor=Postprocessor(threshold=0.5),
        version="bench-full-size-random",
        label="random weights, for speed measurements only",
    )


def widen_network(small, config):
    """An ``AttentionUNet(config)`` that computes what ``small`` computes.

    ``config`` has as many levels as ``small`` and each as wide or wider.
    Every weight of ``small`` goes to the same place, the new channels get
    zero weights, and their BatchNorms scale by 0 and shift by 0, so they
    carry exact zeros through every layer and add nothing to the real
    channels' sums. The decoder's first convolution reads [gated skip, up
    path] concatenated, so its input weights go to both halves. The wider
    network does the full-size network's arithmetic (dense convolutions
    multiply zeros as fast as anything else).
    """
    import torch

    from model.network import AttentionUNet

    if len(config.filters) != len(small.config.filters) or any(
        b < a for a, b in zip(small.config.filters, config.filters)
    ):
        raise ValueError(f"cannot widen filters {small.config.filters} to {config.filters}")
    if (config.in_channels, config.out_channels) != (small.config.in_channels, small.config.out_channels):
        raise ValueError("widening keeps the input and output channels")
    wide = AttentionUNet(config).eval()
    source = small.state_dict()
    state = {}
    for key, target in wide.state_dict().items():
        value = source[key]
        if target.ndim == 0:  # num_batches_tracked
            state[key] = value.clone()
            continue
        out = torch.ones_like(target) if key.endswith("running_var") else torch.zeros_like(target)
        if key.startswith("decoder.") and key.endswith("body.0.weight"):  # (out, 2 * skip, 3, 3): two halves
            half, small_half = target.shape[1] // 2, value.shape[1] // 2
            out[: value.shape[0], :small_half] = value[:, :small_half]
            out[: value.shape[0], half : half + small_half] = value[:, small_half:]
        else:
            out[tuple(slice(0, n) for n in value.shape)] = value
        state[key] = out
    wide.load_state_dict(state)
    return wide


def load_segmenter(checkpoint: Path, batch: int | None, threads: int, device: str | None = None, compile_network: bool = False,
                   cpu_bf16: bool = False, tta: str = "auto", cudnn_benchmark: bool = True, fold_bn: bool | None = None):
    """The Segmenter a worker with these settings serves (``tta``: INFER_TTA's value, "auto" included)."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.inference import Segmenter, serving_tta

    if threads:
        torch.set_num_threads(threads)
    loaded = load_checkpoint(checkpoint)
    return Segmenter(loaded, device=device, batch_size=batch, compile_network=compile_network,
                     cpu_bf16=cpu_bf16, flip_tta=serving_tta(tta, loaded), cudnn_benchmark=cudnn_benchmark,
                     fold_bn=fold_bn)


def device_name(segmenter) -> str:
    import torch

    if segmenter.cuda:
        return f"{torch.cuda.get_device_name(segmenter.device)} ({segmenter.device})"
    return f"CPU ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


# -- stages ------------------------------------------------------------------------------


@dataclass
class StageResult:
    name: str
    images: int
    seconds: float
    failed: int = 0
    notes: dict = field(default_factory=dict)
    cpu_seconds: float | None = None  # CPU time the stage's processes used (all threads, all cores)

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_ms_per_image(self) -> float | None:
        """Core-milliseconds per image: unlike img/s, hardly moved by other
        programs sharing the machine."""
        return None if self.cpu_seconds is None else 1000.0 * self.cpu_seconds / self.images


def load_average() -> float | None:
    """The 1-minute load average at the end of a stage: above the cores the
    stage used, something else was running too."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def host_ticks() -> tuple[int, int] | None:
    """(stolen, all) clock ticks of the machine's CPUs so far, from the first
    line of /proc/stat; None where there is none (not Linux). Stolen ticks are
    those in which the hypervisor ran another guest while one of this VM's
    CPUs had work: on a shared cloud host they make a stage slower without
    its processes using more CPU."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest time is in user)
    return ticks[7], sum(ticks)


def steal_percent(since: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time stolen by the hypervisor since ``host_ticks()`` gave ``since``."""
    now = host_ticks()
    if since is None or now is None or now[1] <= since[1]:
        return None
    return round(100.0 * (now[0] - since[0]) / (now[1] - since[1]), 1)


def cpu_time(pids: Sequence[int] = ()) -> float:
    """CPU seconds used so far by this process and the processes ``pids``
    (user + system, their waited-for children included)."""
    import psutil

    total = sum(os.times()[:2])
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (an API under gunicorn: the master and its workers)."""
    import psutil

    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return [pid]


def frames_of(segmenter, paths: Sequence[Path], k: int) -> list[np.ndarray]:
    """Preprocessed frames of the first k distinct images (the model stage's input)."""
    from worker.decode import decode_image

    frames = []
    for path in list(dict.fromkeys(paths))[:k]:
        frame, _ = segmenter.prepare(decode_image(path.read_bytes()).pixels)
        frames.append(frame)
    return frames


def measure_model(segmenter, frames: list[np.ndarray], n: int) -> StageResult:
    """The network alone: ``Segmenter.stream`` (stack, to device, forward,
    sigmoid, back to host) on preprocessed frames, batch_size at a time, n
    images, each batch read after the next is launched (on a CPU: at once)."""
    batch = segmenter.batch_size
    batches = [[frames[(i + j) % len(frames)] for j in range(min(batch, n - i))] for i in range(0, n, batch)]
    segmenter.forward(batches[0])  # warm-up: allocation, kernel selection, compilation
    if segmenter.cuda:
        import torch

        torch.cuda.synchronize(segmenter.device)
    start, cpu, ticks = time.perf_counter(), cpu_time(), host_ticks()
    for _ in segmenter.stream(batches):  # as the pipeline feeds it: the next batch launched before the last is read
        pass
    seconds, cpu = time.perf_counter() - start, cpu_time() - cpu
    return StageResult("model", n, seconds, notes={"steal_pct": steal_percent(ticks), "load": load_average()},
                       cpu_seconds=cpu)


# Before and after the other stages, the network alone may differ this much (percent of their mean) before the
# bench says that the machine's speed changed during the run.
DRIFT_WARN_PCT = 10.0


def bracketed(before: StageResult, after: StageResult) -> tuple[StageResult, str | None]:
    """One model figure from two measurements of the network alone, one taken
    before the other stages and one after them: all their images over all
    their seconds (and CPU), so a speed that changed steadily during the run
    is counted at about its value in the middle, where the other stages ran.
    A shared host's speed moves by minutes (on 2026-12-07 a 2-core KVM Xeon ran
    the full-size network at 1.67-2.25 img/s in 10-second slices, with phases
    of a minute), so one measurement before the others could make a ratio
    up to ~15% off either way. The notes give both rates and ``drift_pct``,
    how far after is from before (percent of their mean); the second value
    is a warning to print when that is more than ``DRIFT_WARN_PCT``, else None."""
    seconds = before.seconds + after.seconds
    cpu = None if before.cpu_seconds is None or after.cpu_seconds is None else before.cpu_seconds + after.cpu_seconds
    drift = 200.0 * (after.rate - before.rate) / (after.rate + before.rate)
    steal = [(r.notes.get("steal_pct"), r.seconds) for r in (before, after)]
    notes = {"before_img_s": round(before.rate, 3), "after_img_s": round(after.rate, 3), "drift_pct": round(drift, 1),
             # the stolen share over both, weighted by their lengths
             "steal_pct": (round(sum(p * s for p, s in steal) / seconds, 1)
                           if seconds > 0 and all(p is not None for p, _ in steal) else None),
             "load": after.notes.get("load")}
    result = StageResult(before.name, before.images + after.images, seconds, before.failed + after.failed, notes, cpu)
    warning = None
    if abs(drift) > DRIFT_WARN_PCT:
        warning = (f"the network alone ran {abs(drift):.0f}% {'faster' if drift > 0 else 'slower'} after the other stages "
                   f"than before them ({before.rate:.3g} -> {after.rate:.3g} img/s): the machine's speed changed during "
                   f"the run (other guests on a shared host), so the ratios are uncertain by about that much; run again")
    return result, warning


def measure_pipeline(
    segmenter, paths: Sequence[Path], chunk: int, threads: int, gpu_decode: str = "auto", overlays: bool = True,
    reduced_jpeg: bool = True, concurrency: int = 1, gpu_decode_batch: bool = True, io_priority: str = "auto",
) -> StageResult:
    """``Pipeline.run`` on chunks of ``chunk`` files, as the worker calls it per task
    (``overlays``: render overlay PNGs too, as OVERLAYS=eager workers do;
    ``reduced_jpeg``: JPEG_DECODE=reduced; ``concurrency``: chunks run at once
    from that many threads, as a WORKER_CONCURRENCY worker's task threads do;
    ``gpu_decode_batch``: GPU_DECODE_BATCH; ``io_priority``: IO_PRIORITY)."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.pipeline import Pipeline

    pipeline = Pipeline(segmenter, threads=threads, gpu_decode=gpu_decode, overlays=overlays, reduced_jpeg=reduced_jpeg,
                        gpu_decode_batch=gpu_decode_batch, io_priority=io_priority)
    chunks = [[(f"img-{i + j}", p.read_bytes) for j, p in enumerate(paths[i : i + chunk])] for i in range(0, len(paths), chunk)]
    try:
        pipeline.run([("warm-up", paths[0].read_bytes)])
        pipeline.cpu_seconds.clear()
        start, cpu, ticks = time.perf_counter(), cpu_time(), host_ticks()
        if concurrency == 1:  # in this thread, as a solo worker runs its tasks
            results = [r for chunk_items in chunks for r in pipeline.run(chunk_items)]
        else:
            with ThreadPoolExecutor(concurrency, thread_name_prefix="bench-task") as tasks:
                results = [r for rs in tasks.map(pipeline.run, chunks) for r in rs]
        seconds, cpu, steal = time.perf_counter() - start, cpu_time() - cpu, steal_percent(ticks)
    finally:
        pipeline.close()
    failed = sum(not r.ok for r in results)
    tumors = sum(bool(r.ok and r.stats.tumor_detected) for r in results)
    decoder = pipeline.decode
    name = getattr(getattr(decoder, "func", decoder), "__name__", type(decoder).__name__)
    if pipeline.reduces_jpeg:
        name += f"(long_side={decoder.keywords['long_side']})"
    from worker.gpu_decode import GpuJpegDecoder

    if isinstance(decoder, GpuJpegDecoder):  # how many went to nvJPEG, and how
        name += (f"(gpu={decoder.gpu_images}, cpu={decoder.cpu_images}, "
                 f"{'batched' if pipeline.gpu_decode_batch else 'one call per image'})")
    notes = {"tumor_detected": tumors, "decoder": name, "steal_pct": steal, "load": load_average(),
             # core-ms per image of each step in this run (Pipeline.cpu_seconds); run() prints it under the table
             "cpu_ms_by_step": {k: 1000.0 * v / len(paths) for k, v in pipeline.cpu_seconds.items() if v > 0}}
    return StageResult("pipeline", len(paths), seconds, failed, notes, cpu_seconds=cpu)


# -- cost breakdown --------------------------------------------------------------------------


def step_costs(segmenter, paths: Sequence[Path], k: int = 6, reduced_jpeg: bool = False) -> dict[str, float]:
    """Milliseconds per image of each CPU-side step, one after another in one
    thread, averaged over k images (the network excluded: see the model stage).
    ``reduced_jpeg``: decode and preprocess as a JPEG_DECODE=reduced worker
    does (the overlay, drawn in the API, still gets the full-size pixels)."""
    import torch

    from model.postprocess import render_overlay
    from worker.decode import decode_image
    from worker.pipeline import reduced_decoder
    from worker.png import encode_mask_png, encode_png

    # postprocess: what the worker does after the network (Segmenter.finish_windowed): restore the
    # probabilities where the tumor can be, threshold, drop small regions, fill holes
    steps = ["read", "decode", "preprocess", "postprocess", "statistics", "overlay", "mask PNG", "overlay PNG"]
    totals = dict.fromkeys(steps, 0.0)
    sample = list(dict.fromkeys(paths))[:k]
    threads = torch.get_num_threads()
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one core's worth, like one pool thread when the network has the others
    try:
        for path in sample:
            clock = time.perf_counter()

            def lap(name):
                nonlocal clock
                now = time.perf_counter()
                totals[name] += now - clock
                clock = now

            data = path.read_bytes()
            lap("read")
            image = (reduced_decoder(segmenter) if reduced_jpeg else decode_image)(data)
            lap("decode")
            frame, geometry = segmenter.prepare(image.pixels, image.full_shape)
            lap("preprocess")
            plane = segmenter.forward([frame])[0]
            clock = time.perf_counter()
            prediction = segmenter.finish_windowed(plane, geometry)
            mask = prediction.mask
            lap("postprocess")
            prediction.statistics(image.pixel_spacing_mm)
            lap("statistics")
            full = image.pixels if image.full_shape is None else decode_image(data).pixels  # the API's decode
            clock = time.perf_counter()
            overlay = render_overlay(full, mask)
            lap("overlay")
            encode_mask_png(mask, prediction.windows)
            lap("mask PNG")
            encode_png(overlay)
            lap("overlay PNG")
    finally:
        cv2.setNumThreads(previous)
        torch.set_num_threads(threads)
    return {name: 1000.0 * t / len(sample) for name, t in totals.items()}


# -- the system ------------------------------------------------------------------------------


def upload_streaming(base_url: str, api_key: str, paths: Sequence[Path], label: str | None = "bench",
                     path: str = "/v1/jobs", first: int = 0) -> dict:
    """POST /v1/jobs (or, with ``path``, a part of an open job: POST /v1/jobs/<id>/images, no label)
    with the files streamed from disk (multipart with a Content-Length), so the uploader never holds
    the batch in memory. Files are named by their index in the batch, from ``first``."""
    boundary = uuid.uuid4().hex
    label_part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="label"\r\n\r\n{label}\r\n'.encode()
        if label is not None else b""
    )
    heads = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i:05d}-{p.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        for i, p in enumerate(paths, start=first)
    ]
    closing = f"--{boundary}--\r\n".encode()
    length = len(label_part) + sum(len(h) + p.stat().st_size + 2 for h, p in zip(heads, paths)) + len(closing)
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=3600)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Authorization", f"Bearer {api_key}")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        conn.send(label_part)
        for head, path in zip(heads, paths):
            conn.send(head)
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    conn.send(block)
            conn.send(b"\r\n")
        conn.send(closing)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 202:
        raise RuntimeError(f"upload failed: HTTP {response.status}: {body[:300]!r}")
    return json.loads(body)


@dataclass
class System:
    """A running system for the benchmark: database, broker, API, workers."""

    settings: object
    api: object
    key: str
    workers: list
    home: Path
    drop_database: str | None = None

    def client(self):
        from bonedetect.client import Client

        return Client(self.api.url, self.key, timeout=600)


PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextlib.contextmanager
def on_core(core: int | None) -> Iterator[None]:
    """This process (so every process it starts meanwhile) on one core; as before afterwards."""
    if core is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def running_system(
    checkpoint: Path,
    *,
    workers: int,
    threads: int,
    batch: int | None,
    chunk: int,
    io_threads: int,
    broker: str = "sqlite",
    api_process: bool = False,
    extra_env: dict | None = None,
    pin_workers: bool = False,
    app: str = "worker.app",
    api_workers: int = 0,
) -> Iterator[System]:
    """Start the real system in a temporary BONEDETECT_HOME: the embedded
    default (SQLite database and broker), or with ``broker="redis"`` Redis and
    a fresh PostgreSQL database (dropped afterwards). The API runs in a thread
    of this process (``serve_api``), or in its own process with
    ``api_process`` (to measure its memory); the workers are real Celery
    processes (``start_worker``), one torch thread pool of ``threads`` each;
    with ``pin_workers`` worker i may run on this process's i-th core only
    (round robin), like a worker given one CPU by its container. ``app``: the
    workers' Celery app module (bench.standin for the stand-in device).
    ``api_workers``: the API under gunicorn with that many processes of 4
    threads, as docker-compose.yml runs it (0: ``serve_api`` or ``api_process``)."""
    from sqlalchemy import create_engine, text

    from bonedetect.local import serve_api, settings_env, start_worker, stop_process
    from bonedetect.settings import Settings
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker
    from db.tenants import create_tenant

    home = Path(tempfile.mkdtemp(prefix="bonedetect-bench-"))
    env = {
        **os.environ,
        "BONEDETECT_HOME": str(home),
        "MODEL_CHECKPOINT": str(checkpoint),
        "CHUNK_SIZE": str(chunk),
        "INFER_BATCH_SIZE": str(batch or "auto"),
        "TORCH_THREADS": str(threads),
        "IO_THREADS": str(io_threads),
        "QUEUE_NAME": f"bench-{uuid.uuid4().hex[:8]}",
    }
    # Passed on to the processes explicitly: bonedetect.local.settings_env
    # forwards only this process's environment and the Settings fields it knows.
    process_env = {"IO_THREADS": str(io_threads), "LOG_LEVEL": "WARNING", **(extra_env or {})}
    env.update(process_env)
    dbname = None
    if broker == "redis":
        dbname = f"bench_{uuid.uuid4().hex[:10]}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{dbname}"'))
        admin.dispose()
        env["DATABASE_URL"] = PG_ADMIN.rsplit("/", 1)[0] + f"/{dbname}"
        env["BROKER_URL"] = REDIS_URL
    elif broker != "sqlite":
        raise ValueError(f"broker must be 'sqlite' or 'redis', got {broker!r}")
    settings = Settings.from_env(env)
    settings.ensure_home()
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine).begin() as session:
        key = create_tenant(session, "bench")[1]
    engine.dispose()
    procs, api = [], None
    try:
        if api_workers:
            api = ApiProcess(settings, settings_env(settings, **process_env), gunicorn_workers=api_workers)
        elif api_process:
            api = ApiProcess(settings, settings_env(settings, **process_env))
        else:
            api = serve_api(settings)
        cores = sorted(os.sched_getaffinity(0)) if pin_workers else []
        for i in range(workers):
            with on_core(cores[i % len(cores)] if cores else None):  # the worker inherits the affinity
                procs.append(start_worker(settings, name=f"bench{i}-{uuid.uuid4().hex[:4]}", log_path=home / f"worker{i}.log",
                                          app=app, **process_env))
        yield System(settings, api, key, procs, home, dbname)
    finally:
        for proc in procs:
            stop_process(proc)
        if api is not None:
            api.stop()
        if dbname:
            admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
            admin.dispose()
        import shutil

        shutil.rmtree(home, ignore_errors=True)


class ApiProcess:
    """The API in its own process (``bonedetect api``), so its memory can be measured; with
    ``gunicorn_workers`` under gunicorn with that many processes of 4 threads (docker-compose.yml's API)."""

    def __init__(self, settings, env: dict, gunicorn_workers: int = 0):
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        if gunicorn_workers:
            argv = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers",
                    str(gunicorn_workers), "--threads", "4", "--timeout", "600", "api:create_app()"]
        else:
            argv = [sys.executable, "-m", "bonedetect.cli", "api", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the API process did not start")
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        from bonedetect.local import stop_process

        stop_process(self.proc)


def wait_done(client, job_id: str, timeout: float = 3600.0, poll: float = 0.1, on_poll=None,
              max_poll: float = 1.0) -> tuple[dict, float]:
    """``Client.wait``, plus the perf_counter when the job was first seen
    finished. Looked at every 0.1 s near its end and at most every second
    far from it (``PollPacer``): each look costs the API ~3 core-ms, 7-9
    under a busy worker, which on the 2-core CPU came to ~1.5% of the
    machine at a look every 0.25 s."""
    return client.wait(job_id, timeout=timeout, poll=poll, on_poll=on_poll, max_poll=max_poll), time.perf_counter()


def warm_up(system: System, path: Path) -> None:
    """One single-image job per worker (each a chunk of its own), so every
    worker has loaded its model before the clock starts."""
    client = system.client()
    jobs = [upload_streaming(system.api.url, system.key, [path], label=f"warm-up {i}") for i in range(2 * len(system.workers))]
    for job in jobs:
        wait_done(client, job["job_id"], timeout=600)


def measure_system(system: System, paths: Sequence[Path], name: str = "system", jobs: int = 1,
                   uploaders: int = 1, parts: int = 1) -> StageResult:
    """Upload the batch as one job, or as ``jobs`` jobs of consecutive images, sent by ``uploaders``
    clients at once, each sending the next job when its last one was accepted (one: a hospital's
    script sending a night's studies one job after another, so the first jobs are processed while the
    later ones upload); or (``parts`` > 1, one job) as one job opened for parts, its ``parts`` parts
    of consecutive images sent by ``uploaders`` clients at once, then closed. Seconds from the first
    byte sent until the API says the last job is done."""
    from concurrent.futures import ThreadPoolExecutor

    if parts > 1 and jobs > 1:
        raise ValueError("parts: one job sent in parts, or several jobs sent whole, not both")
    warm_up(system, paths[0])
    client = system.client()
    workers = [w.pid for w in system.workers]
    api = process_tree(system.api.pid) if hasattr(system.api, "pid") else []  # an API process (gunicorn's workers too)
    pids = workers + api
    pieces = max(1, min(parts if parts > 1 else jobs, len(paths)))
    batches = [list(p) for p in np.array_split(np.array(paths, dtype=object), pieces)]
    starts = np.cumsum([0] + [len(b) for b in batches])[:-1].tolist()
    started_at = datetime.now(timezone.utc)
    # this process: the uploader and poller, and the API's threads when it runs here
    start, cpu, ticks, here = time.perf_counter(), cpu_time(pids), host_ticks(), cpu_time()
    api_cpu = cpu_time(api) - cpu_time()
    per_worker = [cpu_time([pid]) - cpu_time() for pid in workers]
    with ThreadPoolExecutor(max(1, min(uploaders, len(batches))), thread_name_prefix="bench-upload") as uploads:
        if parts > 1:
            job_ids = [client.open_job(label=f"bench {len(paths)} in {len(batches)} parts")["job_id"]]
            url = f"/v1/jobs/{job_ids[0]}/images"
            list(uploads.map(lambda b: upload_streaming(system.api.url, system.key, b[1], label=None, path=url,
                                                        first=b[0]), zip(starts, batches)))
            client.close_job(job_ids[0])
        else:
            job_ids = [job["job_id"] for job in uploads.map(
                lambda b: upload_streaming(system.api.url, system.key, b, label=f"bench {len(b)}"), batches)]
    uploaded = time.perf_counter() - start
    finals = [wait_done(client, job_id) for job_id in job_ids]
    end = max(seen for _, seen in finals)
    cpu, steal, here = cpu_time(pids) - cpu, steal_percent(ticks), cpu_time() - here
    per_worker = [round(cpu_time([pid]) - cpu_time() - before, 1) for pid, before in zip(workers, per_worker)]
    counts: dict[str, int] = {}
    for final, _ in finals:
        for status, n in final["counts"].items():
            counts[status] = counts.get(status, 0) + n
    statuses = sorted({final["status"] for final, _ in finals})
    notes = {"upload_s": round(uploaded, 2), "status": "/".join(statuses), "worker_cpu_s": per_worker,
             **queue_timeline(system, job_ids, started_at, end - start), "steal_pct": steal,
             "load": load_average()}
    if len(batches) > 1:
        notes = {("parts" if parts > 1 else "jobs"): len(batches), "uploaders": min(uploaders, len(batches)), **notes}
    if api:
        notes["api_cpu_s"] = round(cpu_time(api) - cpu_time() - api_cpu, 1)
    notes["bench_cpu_s"] = round(here, 1)  # this process: uploader and poller (and the API when it runs here)
    failed = counts.get("failed", 0) + counts.get("queued", 0)
    return StageResult(name, len(paths), end - start, failed, notes, cpu_seconds=cpu)


def queue_timeline(system: System, job_ids: str | Sequence[str], started_at: datetime, seconds: float) -> dict:
    """Where the system's wall-clock time went, from the image rows: a chunk
    runs from its claim (started_at, one per chunk) to its commit
    (finished_at). Returns the seconds until the first chunk was claimed
    (upload, enqueue, broker delivery), the seconds inside the job during
    which no worker held a chunk (the queue's cost between chunks: ack, broker
    delivery, claim), and the seconds from the last commit until the poller
    saw the job done."""
    from sqlalchemy import select

    from db.models import Image
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(system.settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
            rows = session.execute(select(Image.started_at, Image.finished_at).where(Image.job_id.in_(ids))).all()
    finally:
        engine.dispose()

    def utc(t: datetime) -> datetime:
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)  # SQLite returns naive UTC

    chunks = sorted({(utc(a), utc(b)) for a, b in rows if a and b})
    if not chunks:
        return {}
    idle, busy_until = 0.0, chunks[0][0]
    for claim, commit in chunks:
        if claim > busy_until:
            idle += (claim - busy_until).total_seconds()
        busy_until = max(busy_until, commit)
    first = (chunks[0][0] - started_at).total_seconds()
    return {
        "chunks": len(chunks),
        "to_first_claim_s": round(first, 2),
        "between_chunks_idle_s": round(idle, 2),
        "after_last_commit_s": round(seconds - (busy_until - started_at).total_seconds(), 2),
    }


# -- memory ----------------------------------------------------------------------------------


class RssSampler:
    """Samples one process's resident set size (psutil) in a background thread."""

    def __init__(self, pid: int, interval: float = 0.25):
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (perf_counter, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), self.process.memory_info().rss))
            except Exception:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, since: float = 0.0) -> int:
        return max((rss for t, rss in self.samples if t >= since), default=0)


def worker_memory(system: System, paths: Sequence[Path], log=print) -> dict:
    """Worker RSS over one job of len(paths) images: after warm-up (start),
    after the first 10% of images, at the end, and the maximum; MiB."""
    from bonedetect.client import images_through

    warm_up(system, paths[0])
    client = system.client()
    worker = system.workers[0]
    progress: list[tuple[float, int]] = []  # (perf_counter, images finished)
    with RssSampler(worker.pid, interval=0.5) as rss:
        time.sleep(1.0)
        start_rss = rss.samples[-1][1]
        start = time.perf_counter()
        job = upload_streaming(system.api.url, system.key, paths, label="memory")
        last = [0.0]

        def on_poll(j):
            now = time.perf_counter()
            progress.append((now, images_through(j)))
            if now - last[0] > 30:
                last[0] = now
                log(f"  {progress[-1][1]}/{len(paths)} images, worker RSS {rss.samples[-1][1] / 2**20:.0f} MiB")

        final, end = wait_done(client, job["job_id"], poll=1.0, on_poll=on_poll, max_poll=1.0)  # a look a second: the tenths
        time.sleep(1.0)
    tenth = next((t for t, n in progress if n >= len(paths) // 10), end)
    deciles = []  # median RSS while the k-th tenth of the images was processed
    for k in range(10):
        lo = next((t for t, n in progress if n >= k * len(paths) // 10), end)
        hi = next((t for t, n in progress if n >= (k + 1) * len(paths) // 10), end)
        window = sorted(r for t, r in rss.samples if lo <= t <= hi)
        deciles.append(round(window[len(window) // 2] / 2**20, 1) if window else None)
    after_tenth = [r for t, r in rss.samples if t >= tenth]
    mib = 2**20
    return {
        "images": len(paths),
        "status": final["status"],
        "seconds": round(end - start, 1),
        "rss_start_mib": round(start_rss / mib, 1),
        "rss_at_10pct_mib": round(after_tenth[0] / mib, 1) if after_tenth else None,
        "rss_end_mib": round(rss.samples[-1][1] / mib, 1),
        "rss_max_mib": round(rss.peak() / mib, 1),
        "rss_max_after_10pct_mib": round(max(after_tenth) / mib, 1) if after_tenth else None,
        "rss_median_by_tenth_mib": deciles,
    }


def api_memory(system: System, paths: Sequence[Path], sizes: Sequence[int]) -> list[dict]:
    """Peak API RSS while receiving one job of n files, for each n in sizes
    (no worker runs: the images just stay queued)."""
    out = []
    for n in sizes:
        batch = [paths[i % len(paths)] for i in range(n)]
        nbytes = sum(p.stat().st_size for p in batch)
        with RssSampler(system.api.pid, interval=0.02) as rss:
            time.sleep(0.2)
            before = rss.samples[-1][1]
            start = time.perf_counter()
            upload_streaming(system.api.url, system.key, batch, label=f"api memory {n}")
            seconds = time.perf_counter() - start
            time.sleep(0.2)
        out.append(
            {
                "files": n,
                "upload_mib": round(nbytes / 2**20, 1),
                "seconds": round(seconds, 2),
                "rss_before_mib": round(before / 2**20, 1),
                "rss_peak_mib": round(rss.peak() / 2**20, 1),
            }
        )
    return out
