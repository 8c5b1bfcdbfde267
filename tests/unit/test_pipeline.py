"""The worker's in-process pipeline: decode -> network -> postprocess ->
encode, in batches, with a bad file failing alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.checkpoint import load_checkpoint, save_checkpoint
from model.inference import Segmenter
from model.network import AttentionUNet, UNetConfig
from model.postprocess import Postprocessor
from model.preprocess import Preprocessor
from worker.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    network = AttentionUNet(UNetConfig(filters=(4, 8, 16)))
    # A threshold this low marks every pixel: the statistics are then known exactly.
    save_checkpoint(path, network, preprocessor=Preprocessor(64, 0.5, 0.25),
                    postprocessor=Postprocessor(threshold=1e-6), version="tiny-test", label="random weights")
    pipe = Pipeline(Segmenter(load_checkpoint(path), batch_size=3), threads=2)
    yield pipe
    pipe.close()


def jpeg(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(h * w).integers(0, 255, (h, w), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_results_in_order_with_bad_files_failing_alone(pipeline):
    sizes = [(40, 50), (64, 64), (33, 90), (120, 70), (48, 48), (200, 100), (37, 41)]
    items = [(f"img{i}", (lambda d=jpeg(h, w): d)) for i, (h, w) in enumerate(sizes)]
    items.insert(2, ("corrupt", lambda: jpeg(50, 50)[:100]))
    items.insert(5, ("text", lambda: b"hello"))

    def unreadable():
        raise FileNotFoundError("blob vanished")

    items.append(("missing", unreadable))
    results = pipeline.run(items)

    assert [r.image_id for r in results] == [i for i, _ in items]
    by_id = {r.image_id: r for r in results}
    assert "truncated" in by_id["corrupt"].error
    assert "not a PNG or JPEG" in by_id["text"].error
    assert "blob vanished" in by_id["missing"].error
    for i, (h, w) in enumerate(sizes):
        r = by_id[f"img{i}"]
        assert r.ok, r.error
        assert (r.height, r.width) == (h, w)
        assert r.stats.area_px == h * w and r.stats.tumor_detected
        mask = np.array(Image.open(io.BytesIO(r.mask_png)))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        overlay = Image.open(io.BytesIO(r.overlay_png))
        assert overlay.size == (w, h) and overlay.mode == "RGB"
        assert r.processing_ms > 0


def test_cpu_time_is_accounted_per_step_and_within_what_the_process_spent(pipeline):
    """Pipeline.cpu_seconds (the benchmark's per-step profile): every step the run took is there,
    overlays only when eager, and the steps together never exceed the process's own CPU time."""
    import resource

    import torch

    def process_cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime

    items = [(f"img{i}", (lambda d=jpeg(600 + 40 * i, 500): d)) for i in range(6)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the network's work in this thread, so "forward" is most of it
    try:
        pipeline.cpu_seconds.clear()
        before = process_cpu()
        results = pipeline.run(items)
        spent = process_cpu() - before
    finally:
        torch.set_num_threads(threads)
    assert all(r.ok for r in results)
    steps = dict(pipeline.cpu_seconds)
    for step in ("read", "decode", "prepare", "forward", "restore+postprocess", "statistics", "mask PNG", "overlay"):
        assert steps.get(step, 0) > 0, (step, steps)
    assert set(steps) <= set(Pipeline.STEPS)
    assert sum(steps.values()) <= spent * 1.05 + 0.01, (steps, spent)

    lazy = Pipeline(pipeline.segmenter, threads=2, overlays=False)
    try:
        lazy.run(items[:2])
    finally:
        lazy.close()
    assert lazy.cpu_seconds["overlay"] < 0.002 and lazy.cpu_seconds["mask PNG"] > 0


def test_wall_time_says_how_long_the_network_ran_and_waited(pipeline):
    """Pipeline.wall_seconds (the worker's per-chunk log line): a slow reader shows up as the
    network waiting for input, not as time in the forward pass."""
    import time

    def slow(data: bytes) -> bytes:
        time.sleep(0.15)
        return data

    items = [(f"img{i}", (lambda d=jpeg(500, 400): slow(d))) for i in range(4)]
    pipeline.wall_seconds.clear()
    start = time.perf_counter()
    results = pipeline.run(items)
    elapsed = time.perf_counter() - start
    assert all(r.ok for r in results)
    walls = dict(pipeline.wall_seconds)
    assert set(walls) == {"forward", "input", "finishing", "draining", "network"}, walls
    assert walls["forward"] > 0 and walls["finishing"] >= 0 and walls["draining"] >= 0
    # reads of 0.15 s on the pool's threads: the network waited for at least the first of them
    assert walls["input"] >= 0.14, walls
    assert walls["forward"] < elapsed - 0.14, (walls, elapsed)


def test_lazy_workers_decode_large_jpegs_smaller_and_answer_at_full_size():
    """JPEG_DECODE=reduced: a worker with lazy overlays decodes a large JPEG at a fraction of its
    size (twice the frame or more); the mask comes back at the file's size and is as close to the
    drawn lesion as a full decode's."""
    from model.checkpoint import SYNTHETIC_CHECKPOINT
    from training.synthetic import synthetic_jpegs
    from worker.decode import decode_image

    segmenter = Segmenter(load_checkpoint(SYNTHETIC_CHECKPOINT), batch_size=2)
    files, truth = synthetic_jpegs(3, seed=11, sides=(400, 550))
    files = [(name, _upscaled_even(data)) for name, data in files]  # 800-1100 px, even sides: decoded at 1/2
    truth = {name: np.kron(mask, np.ones((2, 2), mask.dtype)) for name, mask in truth.items()}
    items = [(name, (lambda d=data: d)) for name, data in files]
    reduced = Pipeline(segmenter, threads=2, overlays=False)
    full = Pipeline(segmenter, threads=2, overlays=False, reduced_jpeg=False)
    eager = Pipeline(segmenter, threads=2)
    try:
        assert reduced.decode.keywords == {"long_side": 2 * segmenter.preprocessor.size} and reduced.reduces_jpeg
        assert full.decode is decode_image and eager.decode is decode_image, "an eager overlay needs the full pixels"
        assert not (full.reduces_jpeg or eager.reduces_jpeg)
        shrunk = [reduced.decode(data) for _, data in files]
        assert all(d.full_shape == d.shape and d.pixels.shape[0] < d.shape[0] for d in shrunk), "it did decode smaller"
        small, large = reduced.run(items), full.run(items)
    finally:
        reduced.close(), full.close(), eager.close()
    for (name, _), r, f in zip(files, small, large):
        assert r.ok and f.ok, (r.error, f.error)
        assert (r.width, r.height) == (f.width, f.height) == truth[name].shape[::-1]
        a = np.asarray(Image.open(io.BytesIO(r.mask_png))) > 0
        b = np.asarray(Image.open(io.BytesIO(f.mask_png))) > 0
        t = truth[name] > 0
        assert a.shape == t.shape

        def dice(x, y):
            return 2 * (x & y).sum() / (x.sum() + y.sum())

        # the network moves with a gray level here and there (the frames differ by ~0.2 on average), so
        # the masks are not equal, but they are as good: as close to the lesion that was drawn
        assert b.any() and dice(a, b) > 0.9, name
        assert dice(a, t) >= dice(b, t) - 0.03, (name, dice(a, t), dice(b, t))


def test_jpeg_decode_setting_reaches_the_worker_processes():
    from bonedetect.local import settings_env
    from bonedetect.settings import Settings

    assert Settings.from_env({}).jpeg_decode == "reduced"
    full = Settings.from_env({"JPEG_DECODE": " Full "})
    assert full.jpeg_decode == "full" and Settings.from_env(settings_env(full)).jpeg_decode == "full"
    with pytest.raises(ValueError, match="JPEG_DECODE must be one of reduced, full"):
        Settings.from_env({"JPEG_DECODE": "half"})


def test_io_threads_yield_the_cores_to_a_network_on_the_cpu(pipeline, tmp_path):
    """IO_PRIORITY=auto where the network runs on the CPU: the pool's threads run under SCHED_IDLE, so a waking
    one does not take a core from the network's threads (whose OpenMP team waits for its slowest member at
    every layer); the thread that runs the network keeps its priority; normal leaves the pool as it is; on
    CUDA, where the pool's work sets the rate, auto is normal. The masks do not depend on it."""
    import os

    from bonedetect.local import settings_env
    from bonedetect.settings import Settings
    from model.checkpoint import SYNTHETIC_CHECKPOINT
    from worker import pipeline as pipeline_module
    from worker.pipeline import pool_priority
    from worker.tasks import build_context

    assert (pool_priority("auto", cuda=False), pool_priority("auto", cuda=True)) == ("idle", "normal")
    assert pool_priority("idle", cuda=True) == "idle" and pool_priority("normal", cuda=False) == "normal"
    assert pool_priority(" Idle ", cuda=True) == "idle"  # read as the environment's IO_PRIORITY is
    with pytest.raises(ValueError, match="IO_PRIORITY must be one of auto, idle, normal, got 'low'"):
        pool_priority("low", cuda=False)
    assert pipeline.io_priority == ("normal" if pipeline.segmenter.cuda else "idle")

    # the setting, from the environment to the worker's pipeline
    assert Settings.from_env({}).io_priority == "auto"
    chosen = Settings.from_env({"IO_PRIORITY": " Normal "})
    assert Settings.from_env(settings_env(chosen)).io_priority == "normal"
    with pytest.raises(ValueError, match="IO_PRIORITY must be one of auto, idle, normal, got 'low'"):
        Settings.from_env({"IO_PRIORITY": "low"})
    env = {"BONEDETECT_HOME": str(tmp_path), "MODEL_CHECKPOINT": str(SYNTHETIC_CHECKPOINT), "TORCH_COMPILE": "off",
           "ALLOCATOR": "system", "OPENCV_THREADS": "0", "INFER_TTA": "off"}
    for mode in ("auto", "normal"):
        ctx = build_context(Settings.from_env({**env, "IO_PRIORITY": mode}))
        try:
            cuda = ctx.pipeline.segmenter.cuda
            assert ctx.pipeline.io_priority == ("normal" if mode == "normal" or cuda else "idle")
        finally:
            ctx.pipeline.close()

    # the threads themselves
    if not hasattr(os, "SCHED_IDLE"):
        pytest.skip("no SCHED_IDLE here (not Linux): the pool keeps its priority")

    def policies(pipe):
        return set(pipe.pool.map(lambda _: os.sched_getscheduler(0), range(8)))  # every thread it started

    items = [(f"img{i}", (lambda d=jpeg(60 + 9 * i, 80): d)) for i in range(5)]
    idle = Pipeline(pipeline.segmenter, threads=2, io_priority="idle")
    normal = Pipeline(pipeline.segmenter, threads=2, io_priority="normal")
    try:
        yielding, plain = idle.run(items), normal.run(items)
        if pipeline_module._idle_refused.is_set():
            pytest.skip("SCHED_IDLE refused here (a sandboxed kernel): the pool keeps its priority, logged")
        assert policies(idle) == {os.SCHED_IDLE}
        assert policies(normal) == {os.SCHED_OTHER}
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the network's thread: this one
    finally:
        idle.close()
        normal.close()
    assert all(r.ok for r in yielding)
    assert [r.mask_png for r in yielding] == [r.mask_png for r in plain]
    assert [r.stats for r in yielding] == [r.stats for r in plain]


def _upscaled_even(data: bytes) -> bytes:
    """A JPEG at twice the size (both sides even, so a reduced decode applies), quality 92."""
    im = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    im.resize((2 * im.width, 2 * im.height), Image.BICUBIC).save(buf, "JPEG", quality=92)
    return buf.getvalue()


class QueuedPlanes:
    """Stands in, on the CPU, for a CUDA batch still on its way: not ready until read."""

    def __init__(self, planes, log, k):
        self.planes, self.log, self.k = planes, log, k

    ready = False

    def result(self):
        self.log.append(("read", self.k))
        return self.planes.result()


def test_on_cuda_the_next_batch_is_launched_before_the_last_one_is_read(pipeline, monkeypatch):
    """Segmenter.submit returns at once on CUDA: the pipeline launches batch k+1 before it reads batch k, so the
    GPU has work queued while the batch is handed to the pool; results stay the same and in order, with a bad
    file failing alone, and a batch of nothing but bad files in the middle."""
    sizes = [(40, 50), (64, 64), (33, 90), (120, 70), (48, 48), (200, 100), (37, 41), (90, 90)]
    items = [(f"img{i}", (lambda d=jpeg(h, w): d)) for i, (h, w) in enumerate(sizes)]
    items[3:3] = [("bad1", lambda: b"x"), ("bad2", lambda: b"y"), ("bad3", lambda: b"z")]  # batch 1 of 3
    items.insert(8, ("corrupt", lambda: jpeg(50, 50)[:100]))
    plain = pipeline.run(items)
    segmenter, log = pipeline.segmenter, []
    submit = segmenter.submit

    def queued(frames):
        k = sum(1 for event in log if event[0] == "submit")
        log.append(("submit", k))
        return QueuedPlanes(submit(frames), log, k)

    monkeypatch.setattr(segmenter, "submit", queued)
    results = pipeline.run(items)
    assert [r.image_id for r in results] == [i for i, _ in items]
    for a, b in zip(plain, results):
        assert a.error == b.error
        if a.ok:
            assert a.stats == b.stats and a.mask_png == b.mask_png
    # four batches of 3: [img0-2] [bad1-3] [img3, img4, corrupt] [img5-7]; the all-bad one launches nothing, so
    # the batch before it is read then
    assert len(items) == 12
    assert log == [("submit", 0), ("read", 0), ("submit", 1), ("submit", 2), ("read", 1), ("read", 2)]


def test_forward_in_batches_equals_each_batch_submitted_alone(pipeline):
    segmenter = pipeline.segmenter  # batch_size 3
    rng = np.random.default_rng(0)
    frames = [rng.normal(size=(64, 64)).astype(np.float32) for _ in range(7)]
    whole = segmenter.forward(frames)
    assert whole.shape == (7, 64, 64) and whole.dtype == np.float32
    parts = [segmenter.submit(frames[i : i + 3]) for i in range(0, 7, 3)]
    assert all(p.ready for p in parts), "on a CPU the work is done in submit"
    np.testing.assert_array_equal(whole, np.concatenate([p.result() for p in parts]))
    with pytest.raises(ValueError, match="1 to 3 frames"):
        segmenter.submit(frames[:4])


def test_images_waiting_to_be_finished_stay_within_max_pending_with_a_batch_on_the_device(pipeline, monkeypatch):
    """max_pending bounds what waits for finishing, counting the batch still on the device (found in review: a
    batch of bad files let the launched batch's images in on top of the bound)."""
    import threading
    import time

    segmenter = pipeline.segmenter  # batch 3
    bounded = Pipeline(segmenter, threads=4, max_pending=6)  # two batches: one finishing, one on the device
    submit, log = segmenter.submit, []
    monkeypatch.setattr(segmenter, "submit", lambda frames: QueuedPlanes(submit(frames), log, 0))
    finish, lock, waiting, most = bounded._finish, threading.Lock(), [0], [0]

    def slow_finish(item, plane):
        time.sleep(0.2)  # finishing is the slow side, as on a GPU
        try:
            return finish(item, plane)
        finally:
            with lock:
                waiting[0] -= 1

    real_submit = bounded.pool.submit

    def counting_submit(fn, *args):
        if fn == slow_finish:
            with lock:
                waiting[0] += 1
                most[0] = max(most[0], waiting[0])
        return real_submit(fn, *args)

    monkeypatch.setattr(bounded, "_finish", slow_finish)
    monkeypatch.setattr(bounded.pool, "submit", counting_submit)
    good = [(f"img{i}", (lambda d=jpeg(40 + i, 50): d)) for i in range(12)]
    bad = [(f"bad{i}", lambda: b"not an image") for i in range(3)]
    items = good[:3] + bad + good[3:6] + bad + good[6:]
    try:
        results = bounded.run(items)
    finally:
        bounded.close()
    assert [r.ok for r in results] == [not i.startswith("bad") for i, _ in items]
    assert 3 <= most[0] <= 6, f"{most[0]} images waited to be finished at once"


def test_two_chunks_at_once_share_the_network_one_batch_at_a_time(pipeline, monkeypatch):
    """WORKER_CONCURRENCY=2: two task threads run a chunk each through one Pipeline. The network takes one batch
    at a time (Segmenter.submit: one caller at a time), results are those of the chunks run one after the other,
    and each run's wall-clock account is its own: the one that waited for the other's batch says so."""
    import threading
    import time
    from collections import Counter

    segmenter = pipeline.segmenter  # batch 3
    chunks = [[(f"c{c}-img{i}", (lambda d=jpeg(40 + 9 * i + c, 60 + c): d)) for i in range(7)] for c in range(2)]
    chunks[1].insert(3, ("c1-corrupt", lambda: jpeg(50, 50)[:100]))
    alone = [pipeline.run(chunk) for chunk in chunks]

    submit, inside, most, batches = segmenter.submit, [0], [0], []
    lock = threading.Lock()

    def one_at_a_time(frames):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            batches.append(threading.current_thread().name)
        time.sleep(0.1)  # a batch long enough for the other chunk to ask for the network meanwhile
        try:
            return submit(frames)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(segmenter, "submit", one_at_a_time)
    pipeline.wall_seconds.clear()
    walls, results, start = [Counter(), Counter()], [None, None], threading.Barrier(2)

    def task(c):
        start.wait()
        results[c] = pipeline.run(chunks[c], walls=walls[c])

    threads = [threading.Thread(target=task, args=(c,), name=f"task-{c}") for c in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most[0] == 1, "two batches were in the network at once"
    assert sorted(Counter(batches).values()) == [3, 3], "each chunk ran its three batches"
    first, other = batches[0], ({"task-0", "task-1"} - {batches[0]}).pop()
    assert batches == [first, other] * 3, f"the chunks' batches take turns: {batches}"
    for got, want in zip(results, alone):
        assert [r.image_id for r in got] == [r.image_id for r in want]
        for a, b in zip(got, want):
            assert a.error == b.error
            if a.ok:
                assert a.stats == b.stats and a.mask_png == b.mask_png
    assert "truncated" in {r.image_id: r for r in results[1]}["c1-corrupt"].error
    assert walls[0]["network"] + walls[1]["network"] > 0.09, walls
    for key in ("forward", "input", "finishing", "draining", "network"):
        assert pipeline.wall_seconds[key] == pytest.approx(walls[0][key] + walls[1][key])
