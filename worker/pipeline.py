"""The per-chunk inference pipeline: bytes in, masks, overlays and statistics out.

    read + decode + preprocess (thread pool) -> network (Segmenter.submit,
    this thread) -> restore to full size, postprocess, statistics, mask PNG,
    overlay PNG when overlays are eager (thread pool)

The calling thread only feeds the network: the next batches are decoded and
the previous ones finished in the pool while it runs. At most
``prefetch_batches`` batches are decoded ahead and at most ``max_pending``
images wait to be finished, so memory does not grow with the chunk (a
decoded 3000x2500 radiograph is 7.5 MB, its full-size probability map 30 MB).
One bad image never fails its chunk: it gets an ImageResult with its reason.
JPEGs can be decoded on the GPU (worker/gpu_decode.py, GPU_DECODE=auto|on|off),
a batch's plain JPEGs in one nvJPEG call (GPU_DECODE_BATCH=on|off).
On the CPU, with lazy overlays, a JPEG is decoded at 1/2, 1/4 or 1/8 of its
size, as long as that keeps twice the network's frame (worker/decode.py,
JPEG_DECODE=reduced|full): the worker never needs its full-size pixels.
Where the network runs on the CPU the pool's threads run on the cores it
leaves free (IO_PRIORITY, ``pool_priority``).
The benchmark (python -m bench) runs this same class, so what is measured is
what runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from bonedetect.settings import IO_PRIORITY_MODES, choose
from model.inference import Segmenter
from model.preprocess import Geometry
from model.stats import TumorStats
from worker.decode import DecodedImage, DecodeError, decode_image
from worker.gpu_decode import GpuJpegDecoder, select_decoder
from worker.overlay import overlay_png
from worker.png import encode_mask_png, encode_png

log = logging.getLogger("bonedetect.worker")

# JPEG_DECODE=reduced keeps this many decoded pixels per frame pixel on the long side, at least: with 1
# frames differ from a full decode's by up to 18 gray levels at sharp edges, with 2 by up to 5, for about
# the same decoding time (docs/benchmarks.md).
REDUCED_DECODE_MARGIN = 2


def pool_priority(mode: str, cuda: bool) -> str:
    """IO_PRIORITY resolved for a network on CUDA (``cuda``) or on the CPU: "idle" or "normal".

    auto is idle on a CPU. There the network is the work, and its OpenMP threads wait for each other at
    every layer: a pool thread that wakes and takes one of their cores stalls the other as well, so on two
    cores a worker's decoding and finishing cost its two-thread network more wall time than their own CPU
    time (docs/benchmarks.md). Under Linux's SCHED_IDLE a waking pool thread does not preempt the
    network's, and gets little time while they run: it runs on the cores that the network's threads leave
    between layers and while the network waits for a decoded batch, and the pipeline's bounds
    (``prefetch_batches``, ``max_pending``) make the network wait when the pool falls behind, so nothing
    starves while the worker has the machine to itself. On a 2-core Zen 5, 200 full-size images through the
    system, six alternated pairs of runs: system/model 0.894-0.950 (median 0.923) against 0.868-0.927
    (0.882) with normal threads, the cores the system got 1.85-1.87 against 1.80-1.83 (nice 19 instead:
    0.876 and 0.886). On a GPU the pool's work is what sets the rate: normal. Under other CPU-heavy
    processes at normal priority (a machine shared with other work) idle threads get little of the CPU,
    and one may hold Python's lock that the network's thread needs: the whole worker slows with them,
    IO_PRIORITY=normal there."""
    mode = choose("IO_PRIORITY", mode, IO_PRIORITY_MODES)
    if mode == "auto":
        return "normal" if cuda else "idle"
    return mode


_idle_refused = threading.Event()  # warned once that SCHED_IDLE is not available here


def _run_when_idle() -> None:
    """A pool thread's initializer for io_priority "idle": this thread under SCHED_IDLE. Where there is none
    (not Linux) or it is refused, the thread keeps its priority and the worker says so once."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as err:
        if not _idle_refused.is_set():
            _idle_refused.set()
            log.warning("IO_PRIORITY=idle: no SCHED_IDLE here (%s); the I/O threads run at normal priority", err)


def reduced_decoder(segmenter: Segmenter) -> Callable[[bytes, int], DecodedImage]:
    """``decode_image`` as a JPEG_DECODE=reduced worker calls it for this network's frame."""
    return functools.partial(decode_image, long_side=REDUCED_DECODE_MARGIN * segmenter.preprocessor.size)


@dataclass
class ImageResult:
    image_id: str
    error: str | None = None
    width: int | None = None
    height: int | None = None
    stats: TumorStats | None = None
    mask_png: bytes | None = None
    overlay_png: bytes | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    spacing_source: str | None = None
    processing_ms: float | None = None
    source_format: str | None = None  # "PNG" | "JPEG" | "DICOM" once decoded
    seg_dcm: bytes | None = None  # DICOM sources: the DICOM SEG of the mask (worker/seg.py)
    seg_error: str | None = None  # why a DICOM source got no SEG (the mask and statistics still stand)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Decoded:
    image_id: str
    started: float
    image: DecodedImage | None = None
    error: str | None = None
    frame: np.ndarray | None = None  # (S, S) float32, the network's input (a tensor when prepared on the GPU)
    geometry: Geometry | None = None
    shape: tuple[int, int] | None = None  # (H, W) of the image as uploaded (DecodedImage.shape), read before pixels go
    data: bytes | None = None  # the file, read and left for its batch's one nvJPEG call (Pipeline._decode_together)


def _on_device(pixels) -> bool:
    return pixels is not None and not isinstance(pixels, np.ndarray)


@contextlib.contextmanager
def _synchronised(stream):
    import torch

    with torch.cuda.stream(stream):
        _sleep_until_done(stream)
        yield stream
        _sleep_until_done(stream)


def _sleep_until_done(stream) -> None:
    """``stream.synchronize()``, sleeping instead of spinning: with fewer CUDA contexts than cores, CUDA's
    default waits spin a core, one the finishing threads need (as ``Planes.result`` does)."""
    import torch

    done = torch.cuda.Event(blocking=True)
    done.record(stream)
    done.synchronize()


def _host(pixels) -> np.ndarray:
    """Pixels as a numpy array (decoded on the GPU, they are a torch tensor there)."""
    return pixels if isinstance(pixels, np.ndarray) else pixels.cpu().numpy()


def _decode_error(err: Exception) -> str:
    """The user's reason for a file that did not decode."""
    if isinstance(err, DecodeError):
        return str(err)
    return f"not a decodable image: {type(err).__name__}: {err}"  # a decoder bug must not fail the chunk either


class FairLock:
    """A lock that threads get in the order they asked for it (``threading.Lock`` promises no order: a
    thread that releases it and asks again at once may get it back before one that has waited)."""

    def __init__(self):
        self._turns = threading.Condition()
        self._next = self._serving = 0
        self._abandoned: set[int] = set()  # tickets whose thread stopped waiting (an exception while it waited)

    def __enter__(self) -> None:
        with self._turns:
            ticket, self._next = self._next, self._next + 1
            try:
                self._turns.wait_for(lambda: self._serving == ticket)
            except BaseException:  # the turn must not wait for a thread that is gone
                if self._serving == ticket:
                    self._pass_turn()
                else:
                    self._abandoned.add(ticket)
                raise

    def __exit__(self, *exc) -> None:
        with self._turns:
            self._pass_turn()

    def _pass_turn(self) -> None:
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._turns.notify_all()


class Pipeline:
    """Runs chunks of (image_id, read_bytes) through decode, the network and
    postprocessing (module docstring).

    Args:
        segmenter: the loaded network; its ``batch_size`` is the forward batch.
        max_pixels: images above this are refused before decoding.
        threads: decode/finish threads that overlap the network.
        io_priority: their CPU scheduling, IO_PRIORITY: "idle" (SCHED_IDLE: on
            the cores the network leaves free, without preempting it), "normal",
            or "auto": idle when the network runs on the CPU (``pool_priority``).
        gpu_decode: "auto" (nvJPEG through torchvision when the segmenter is on
            CUDA and torchvision imports), "on" (required; ValueError if not
            possible) or "off" (the worker passes its GPU_DECODE setting).
        gpu_decode_batch: with JPEGs decoded on the GPU, a batch's plain JPEGs
            in one nvJPEG call after each was read and its header checked in
            the pool (worker/gpu_decode.py says why); False: one call per
            image, in the pool's threads (GPU_DECODE_BATCH=off).
        prefetch_batches: batches decoded ahead of the network.
        max_pending: images decoded and run through the network but not yet
            finished, before the network waits; None: two batches, at least
            twice the threads.
        overlays: render and encode each image's overlay PNG here (OVERLAYS=eager);
            False leaves ``overlay_png`` None for the API to render on request
            (OVERLAYS=lazy, worker/overlay.py).
        reduced_jpeg: decode JPEGs on the CPU at the smallest of 1/2, 1/4, 1/8
            of their size that keeps twice the network's frame on the long
            side (JPEG_DECODE=reduced): every frame pixel still averages at
            least 2x2 decoded ones, and frames agree with a full decode's to
            a few gray levels (docs/benchmarks.md). Only with ``overlays``
            False, since an overlay is drawn on the full-size pixels. Masks
            and statistics stay at full size (``DecodedImage.shape``).

    ``cpu_seconds`` adds up, per step, the CPU time of the thread that ran it
    (``time.thread_time``), over everything this pipeline has run: where the
    worker's cores go, measured in the run itself (the benchmark prints it).
    The threads a step starts (PyTorch's and OpenCV's own) are not in it.
    ``wall_seconds`` adds up wall-clock time on the calling thread: "forward"
    (the network ran; on CUDA: launching batches and waiting for their
    results), "input" (it waited for decoded images), "finishing"
    (it waited for finishing to catch up: backpressure), "draining" (the
    last images finishing after the network's last batch) and "network"
    (it waited for its turn at the network while another chunk had it), so
    forward over the run's time says how well the network was fed (the
    worker logs it per chunk, from ``run``'s ``walls``). With two chunks at
    once on a CPU, "network" is the other chunk's batches; on CUDA, where a
    turn only launches a batch, the GPU time of the other chunk's batches
    lands in "forward" instead (waiting for this chunk's results), so the two
    chunks' forward shares can add up to more than one.

    Several threads may call ``run`` at once (WORKER_CONCURRENCY: a worker
    holding two chunks): they share the pool and the network, which takes
    one batch at a time, in the order the chunks ask, so one chunk's
    decoding, finishing and database writes overlap another's network
    instead of leaving it idle between chunks. Each run keeps its own
    ``max_pending`` bound.
    """

    STEPS = ("read", "decode", "prepare", "forward", "restore+postprocess", "statistics", "mask PNG", "overlay",
             "DICOM SEG")

    def __init__(
        self,
        segmenter: Segmenter,
        max_pixels: int = 100_000_000,
        threads: int = 4,
        gpu_decode: str = "auto",
        prefetch_batches: int = 2,
        max_pending: int | None = None,
        overlays: bool = True,
        reduced_jpeg: bool = True,
        gpu_decode_batch: bool = True,
        io_priority: str = "auto",
    ):
        if threads < 1 or prefetch_batches < 1:
            raise ValueError(f"threads and prefetch_batches must be at least 1, got {threads} and {prefetch_batches}")
        self.segmenter = segmenter
        self.max_pixels = max_pixels
        self.decode = select_decoder(gpu_decode, segmenter.device)
        self.gpu_decode_batch = bool(gpu_decode_batch)
        self.prefetch_batches = prefetch_batches
        self.overlays = bool(overlays)
        self.reduces_jpeg = bool(reduced_jpeg and not self.overlays and self.decode is decode_image)
        if self.reduces_jpeg:
            self.decode = reduced_decoder(segmenter)
        batch = max(1, segmenter.batch_size)
        self.max_pending = max_pending or max(2 * batch, 2 * threads)
        self._local = threading.local()  # each pool thread's CUDA stream (_device_stream)
        self.cpu_seconds: Counter[str] = Counter()
        self.wall_seconds: Counter[str] = Counter()
        self._cpu_lock = threading.Lock()
        # One batch at a time from the runs of concurrent chunks, in the order asked: Segmenter.submit takes one
        # caller at a time, and a torch.compile'd network is not thread safe (pytorch/pytorch#118260).
        self._network = FairLock()
        self.io_priority = pool_priority(io_priority, bool(segmenter.cuda))
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bonedetect-io",
                                       initializer=_run_when_idle if self.io_priority == "idle" else None)

    @contextlib.contextmanager
    def _step(self, name: str):
        """Adds this thread's CPU time inside the block to ``cpu_seconds[name]``."""
        t0 = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - t0
            with self._cpu_lock:
                self.cpu_seconds[name] += spent

    def _decode(self, image_id: str, read: Callable[[], bytes], together: bool = False) -> _Decoded:
        """Read, decode and preprocess one image (pool thread). ``together``: a file the GPU decoder takes is
        only read, and left in ``data`` for its batch's ``_decode_together``."""
        item = _Decoded(image_id, time.perf_counter())
        try:
            with self._step("read"):
                data = read()
        except Exception as err:  # a blob that cannot be read fails alone
            item.error = f"could not read the uploaded file: {err}"
            return item
        if together:
            try:
                with self._step("decode"):
                    takes = self.decode.takes(data, self.max_pixels)
            except Exception as err:  # not bytes, say: this image fails, not the chunk
                item.error = _decode_error(err)
                return item
            if takes:
                item.data = data
                return item
        with self._device_stream():
            try:
                with self._step("decode"):
                    item.image = self.decode(data, self.max_pixels)
            except Exception as err:
                item.error = _decode_error(err)
                return item
            self._prepare(item)
        return item

    def _decode_together(self, reads: list[Future[_Decoded]]) -> list[_Decoded]:
        """A batch's images, read (and those the GPU decoder does not take decoded) by ``_decode(together=True)``
        in the pool: the rest decoded in one nvJPEG call, then prepared (pool thread). It waits only for
        tasks that were queued before it in the pool's first-in first-out queue, so they are running or done."""
        items = [f.result() for f in reads]
        waiting = [d for d in items if d.data is not None]
        if waiting:
            with self._device_stream():
                with self._step("decode"):
                    try:
                        decoded = self.decode.decode_batch([d.data for d in waiting], self.max_pixels)
                    except Exception as err:  # a decoder bug fails these images, not the chunk
                        decoded = [err] * len(waiting)
                for item, image in zip(waiting, decoded):
                    item.data = None
                    if isinstance(image, Exception):
                        item.error = _decode_error(image)
                    else:
                        item.image = image
                        self._prepare(item)
        return items

    def _prepare(self, item: _Decoded) -> None:
        """The decoded image's frame and geometry, or its error (inside the caller's ``_device_stream``)."""
        pixels = item.image.pixels
        try:
            with self._step("prepare"):
                try:
                    item.frame, item.geometry = self.segmenter.prepare(pixels, item.image.full_shape)
                except Exception:
                    if not _on_device(pixels):
                        raise
                    # out of GPU memory, say: the CPU prepares it as for any other file
                    log.warning("image %s: preparing on the GPU failed; preparing on the CPU", item.image_id, exc_info=True)
                    pixels = item.image.pixels = _host(pixels)
                    item.frame, item.geometry = self.segmenter.prepare(pixels)
        except Exception as err:
            item.error = f"preprocessing failed: {err}"
            item.image = None
            return
        item.shape = item.image.shape
        if not self.overlays:
            item.image.pixels = None  # only an eager overlay reads them again
        elif _on_device(pixels):
            item.image.pixels = _host(pixels)  # the GPU's copy is freed; the overlay is drawn on the host

    def _device_stream(self):
        """A CUDA stream of this pool thread's own while it decodes and prepares on the GPU.

        nvJPEG decodes on a stream of its own and does not wait for the
        current one, so memory the caching allocator hands it must not be
        memory that queued work on a shared stream may still read. Blocks
        freed on this thread's stream are reused only by it, and it is
        synchronised before each decode and after each prepare, so a frame
        is complete before the network's stream reads it (Segmenter.submit
        records that use). A no-op unless JPEGs are decoded on the GPU."""
        if not isinstance(self.decode, GpuJpegDecoder) or not self.segmenter.cuda:
            return contextlib.nullcontext()
        import torch

        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.segmenter.device)
        return _synchronised(stream)

    def _finish(self, item: _Decoded, plane: np.ndarray) -> ImageResult:
        """Probabilities in the frame -> the image's result (pool thread)."""
        image = item.image
        assert image is not None and item.geometry is not None
        h, w = item.shape
        try:
            with self._step("restore+postprocess"):
                prediction = self.segmenter.finish_windowed(plane, item.geometry)
            mask = prediction.mask
            with self._step("statistics"):
                stats = prediction.statistics(image.pixel_spacing_mm)
            with self._step("mask PNG"):
                mask_png = encode_mask_png(mask, prediction.windows)
            with self._step("overlay"):
                overlay = overlay_png(_host(image.pixels), mask) if self.overlays else None
            with self._step("DICOM SEG"):
                seg = self._seg(item.image_id, image, mask)
            return ImageResult(
                image_id=item.image_id,
                width=w,
                height=h,
                stats=stats,
                mask_png=mask_png,
                overlay_png=overlay,
                pixel_spacing_mm=image.pixel_spacing_mm,
                spacing_source=image.spacing_source,
                source_format=image.format,
                **seg,
                processing_ms=(time.perf_counter() - item.started) * 1000.0,
            )
        except Exception as err:
            return ImageResult(
                item.image_id, error=f"postprocessing failed: {err}", width=w, height=h, source_format=image.format
            )

    def _seg(self, image_id: str, image: DecodedImage, mask: np.ndarray) -> dict:
        """{"seg_dcm": bytes} for a DICOM source, or {"seg_error": reason}; {} for PNG/JPEG."""
        if image.format != "DICOM":
            return {}
        try:
            from worker.seg import build_seg

            version = str(getattr(self.segmenter, "version", "unknown"))
            return {"seg_dcm": build_seg(image.dicom or {}, mask, image_id=image_id, model_version=version)}
        except Exception as err:  # the mask and statistics stand without the SEG
            log.warning("image %s: no DICOM SEG: %s", image_id, err)
            return {"seg_error": f"no DICOM SEG: {err}"}

    def run(self, items: Sequence[tuple[str, Callable[[], bytes]]], walls: Counter | None = None) -> list[ImageResult]:
        """Process (image_id, read_bytes) pairs; results come back in input order.

        On CUDA a batch's probabilities are read only after the next batch
        has been launched (``Segmenter.submit``), so the GPU has work queued
        while this thread hands the last batch to the pool and waits for the
        next decoded one; on a CPU each batch is finished as soon as it is
        done, as before. ``walls``: this run's wall-clock seconds are added
        there too (the class docstring's keys), apart from other threads' runs."""
        walls = Counter() if walls is None else walls
        try:
            return self._run(items, walls)
        finally:
            with self._cpu_lock:
                self.wall_seconds.update(walls)

    def _run(self, items: Sequence[tuple[str, Callable[[], bytes]]], walls: Counter) -> list[ImageResult]:
        batch = max(1, self.segmenter.batch_size)
        batches = [items[start : start + batch] for start in range(0, len(items), batch)]
        decoding: deque[Callable[[], list[_Decoded]]] = deque()  # each batch's decoded images, when asked for
        pending: deque[Future[ImageResult]] = deque()  # submitted to finish, oldest first
        finished: list[Future[ImageResult] | ImageResult] = []
        launched = None  # (decoded items, Planes) of the batch on the device, read after the next one is launched
        for k in range(len(batches)):
            # Keep prefetch_batches batches decoding ahead of the network.
            while len(decoding) < self.prefetch_batches and k + len(decoding) < len(batches):
                decoding.append(self._submit_decoding(batches[k + len(decoding)]))
            t0 = time.perf_counter()
            ready = decoding.popleft()()
            good = [d for d in ready if d.image is not None]
            t1 = time.perf_counter()
            # Backpressure: finishing is the slower side on a GPU; bound what waits for it, counting the batch
            # still on the device, which is handed over once this one is launched.
            self._wait_for_finishing(pending, self._good(launched) + len(good))
            t2 = t3 = time.perf_counter()
            planes = None
            if good:
                with self._network:
                    t3 = time.perf_counter()
                    with self._step("forward"):
                        planes = self.segmenter.submit([d.frame for d in good])
            walls["input"] += t1 - t0
            walls["finishing"] += t2 - t1
            walls["network"] += t3 - t2
            walls["forward"] += time.perf_counter() - t3
            if launched is not None:
                self._hand_over(*launched, pending, finished, walls)
                launched = None
            if planes is None or planes.ready:
                self._hand_over(ready, planes, pending, finished, walls)
            else:
                launched = (ready, planes)
            del ready, good, planes
        if launched is not None:
            t0 = time.perf_counter()
            self._wait_for_finishing(pending, self._good(launched))
            walls["finishing"] += time.perf_counter() - t0
            self._hand_over(*launched, pending, finished, walls)
        t0 = time.perf_counter()
        results = [f.result() if isinstance(f, Future) else f for f in finished]
        walls["draining"] += time.perf_counter() - t0
        return results

    def _submit_decoding(self, batch: Sequence[tuple[str, Callable[[], bytes]]]) -> Callable[[], list[_Decoded]]:
        """The batch's images to the pool: read, decoded and prepared one per task, or with the GPU decoder
        and ``gpu_decode_batch`` read one per task and decoded together (``_decode_together``, queued after
        them). Returns what waits for the decoded images, in order."""
        together = self.gpu_decode_batch and isinstance(self.decode, GpuJpegDecoder)
        reads = [self.pool.submit(self._decode, image_id, read, together) for image_id, read in batch]
        if not together:
            return lambda: [f.result() for f in reads]
        return self.pool.submit(self._decode_together, reads).result

    def _wait_for_finishing(self, pending: deque, incoming: int) -> None:
        """Drop finished futures from the front of ``pending``, and wait for the oldest until ``incoming`` more
        images fit within ``max_pending`` (or none is left to wait for)."""
        while pending and (len(pending) + incoming > self.max_pending or pending[0].done()):
            pending.popleft().result()

    @staticmethod
    def _good(launched) -> int:
        """Decodable images in a launched (decoded items, Planes) batch; 0 for None."""
        return sum(d.image is not None for d in launched[0]) if launched is not None else 0

    def _hand_over(self, ready: list[_Decoded], planes, pending: deque, finished: list, walls: Counter) -> None:
        """One batch's probabilities (waiting for the GPU if need be) to the pool's finishing, in order."""
        t0 = time.perf_counter()
        with self._step("forward"):
            probs = iter(planes.result()) if planes is not None else iter(())
        walls["forward"] += time.perf_counter() - t0
        for d in ready:
            if d.image is None:
                finished.append(ImageResult(d.image_id, error=d.error))
            else:
                d.frame = None  # the network is done with it
                future = self.pool.submit(self._finish, d, next(probs))
                pending.append(future)
                finished.append(future)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
