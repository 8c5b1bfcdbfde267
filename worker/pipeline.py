"""The per-chunk inference pipeline: bytes in, masks, overlays and statistics out.

    read + decode + preprocess (thread pool) -> network (Segmenter.forward,
    this thread) -> restore to full size, postprocess, statistics, overlay,
    PNG encoding (thread pool)

The calling thread only feeds the network: the next batches are decoded and
the previous ones finished in the pool while it runs. At most
``prefetch_batches`` batches are decoded ahead and at most ``max_pending``
images wait to be finished, so memory does not grow with the chunk (a
decoded 3000x2500 radiograph is 7.5 MB, its full-size probability map 30 MB).
One bad image never fails its chunk: it gets an ImageResult with its reason.
JPEGs can be decoded on the GPU (worker/gpu_decode.py, GPU_DECODE=auto|on|off).
The benchmark (python -m bench) runs this same class, so what is measured is
what runs.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

from model.inference import Segmenter
from model.postprocess import render_overlay
from model.preprocess import Geometry
from model.stats import TumorStats, tumor_statistics
from worker.decode import DecodedImage, DecodeError
from worker.gpu_decode import select_decoder

log = logging.getLogger("bonedetect.worker")


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
    frame: np.ndarray | None = None  # (S, S) float32, the network's input
    geometry: Geometry | None = None


# PNG encoding was the largest cost of an image after the network: 258 ms of
# one core for a 3000x2500 RGB overlay with libpng's defaults (zlib level 1,
# adaptive row filters). Here: the "Up" row filter for every row (numpy), then
# ISA-L's deflate (python-isal, about 4x zlib's speed at the same size): 51 ms,
# and 1 ms instead of 46 for the mask (docs/benchmarks.md). Without isal,
# libpng with the Up filter: 144 ms. Either way a standard, lossless PNG.
try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a worker dependency
    isal_zlib = None
ISAL_LEVEL = 2  # ISA-L levels 0-3; 2 was the fastest at zlib level 1's size here
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
_PNG_COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: gray, RGB, RGBA


def _png_chunk(kind: bytes, data) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + bytes(data) + struct.pack(">I", crc)


def encode_png(array: np.ndarray) -> bytes:
    """8-bit gray (H, W), RGB (H, W, 3) or RGBA (H, W, 4) array -> PNG bytes
    (channels in PNG's own order, RGB: not OpenCV's BGR)."""
    array = np.asarray(array)
    channels = 1 if array.ndim == 2 else (array.shape[2] if array.ndim == 3 else 0)
    if array.dtype != np.uint8 or channels not in _PNG_COLOR_TYPES or array.size == 0:
        raise ValueError(f"encode_png takes a non-empty uint8 gray, RGB or RGBA image, got {array.dtype} {array.shape}")
    h, w = array.shape[:2]
    if isal_zlib is None:
        bgr = {1: None, 3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}[channels]
        ok, buf = cv2.imencode(".png", cv2.cvtColor(array, bgr) if bgr is not None else array, PNG_PARAMS)
        if not ok:
            raise RuntimeError("PNG encoding failed")
        return buf.tobytes()
    rows = np.ascontiguousarray(array).reshape(h, w * channels)
    filtered = np.empty((h, w * channels + 1), np.uint8)  # each row: filter type byte, then the row
    filtered[:, 0] = 2  # "Up": each byte minus the byte above it, mod 256
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPES[channels], 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", isal_zlib.compress(filtered, ISAL_LEVEL)),
            _png_chunk(b"IEND", b""),
        )
    )


class Pipeline:
    """Runs chunks of (image_id, read_bytes) through decode, the network and
    postprocessing (module docstring).

    Args:
        segmenter: the loaded network; its ``batch_size`` is the forward batch.
        max_pixels: images above this are refused before decoding.
        threads: decode/finish threads that overlap the network.
        gpu_decode: "auto" (nvJPEG through torchvision when the segmenter is on
            CUDA and torchvision imports), "on" (required; ValueError if not
            possible) or "off"; None reads GPU_DECODE from the environment
            (default "auto").
        prefetch_batches: batches decoded ahead of the network.
        max_pending: images decoded and run through the network but not yet
            finished, before the network waits; None: two batches, at least
            twice the threads.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        max_pixels: int = 100_000_000,
        threads: int = 4,
        gpu_decode: str | None = None,
        prefetch_batches: int = 2,
        max_pending: int | None = None,
    ):
        if threads < 1 or prefetch_batches < 1:
            raise ValueError(f"threads and prefetch_batches must be at least 1, got {threads} and {prefetch_batches}")
        self.segmenter = segmenter
        self.max_pixels = max_pixels
        self.decode = select_decoder(gpu_decode or os.environ.get("GPU_DECODE") or "auto", segmenter.device)
        self.prefetch_batches = prefetch_batches
        batch = max(1, segmenter.batch_size)
        self.max_pending = max_pending or max(2 * batch, 2 * threads)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bonedetect-io")

    def _decode(self, image_id: str, read: Callable[[], bytes]) -> _Decoded:
        """Read, decode and preprocess one image (pool thread)."""
        item = _Decoded(image_id, time.perf_counter())
        try:
            data = read()
        except Exception as err:  # a blob that cannot be read fails alone
            item.error = f"could not read the uploaded file: {err}"
            return item
        try:
            item.image = self.decode(data, self.max_pixels)
        except DecodeError as err:
            item.error = str(err)
            return item
        except Exception as err:  # a decoder bug must not fail the chunk either
            item.error = f"not a decodable image: {type(err).__name__}: {err}"
            return item
        try:
            item.frame, item.geometry = self.segmenter.prepare(item.image.pixels)
        except Exception as err:
            item.error = f"preprocessing failed: {err}"
            item.image = None
        return item

    def _finish(self, item: _Decoded, plane: np.ndarray) -> ImageResult:
        """Probabilities in the frame -> the image's result (pool thread)."""
        image = item.image
        assert image is not None and item.geometry is not None
        h, w = image.pixels.shape
        try:
            prediction = self.segmenter.finish(plane, item.geometry)
            prob, mask = prediction.prob, prediction.mask
            stats = tumor_statistics(mask, prob, image.pixel_spacing_mm)
            overlay = render_overlay(image.pixels, mask)
            return ImageResult(
                image_id=item.image_id,
                width=w,
                height=h,
                stats=stats,
                mask_png=encode_png(mask * np.uint8(255)),
                overlay_png=encode_png(overlay),
                pixel_spacing_mm=image.pixel_spacing_mm,
                spacing_source=image.spacing_source,
                source_format=image.format,
                **self._seg(item.image_id, image, mask),
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

    def run(self, items: Sequence[tuple[str, Callable[[], bytes]]]) -> list[ImageResult]:
        """Process (image_id, read_bytes) pairs; results come back in input order."""
        batch = max(1, self.segmenter.batch_size)
        batches = [items[start : start + batch] for start in range(0, len(items), batch)]
        decoding: deque[list[Future[_Decoded]]] = deque()
        pending: deque[Future[ImageResult]] = deque()  # submitted to finish, oldest first
        finished: list[Future[ImageResult] | ImageResult] = []
        for k in range(len(batches)):
            # Keep prefetch_batches batches decoding ahead of the network.
            while len(decoding) < self.prefetch_batches and k + len(decoding) < len(batches):
                decoding.append([self.pool.submit(self._decode, i, r) for i, r in batches[k + len(decoding)]])
            ready = [f.result() for f in decoding.popleft()]
            good = [d for d in ready if d.image is not None]
            # Backpressure: finishing is the slower side on a GPU; bound what waits for it.
            while pending and (len(pending) + len(good) > self.max_pending or pending[0].done()):
                pending.popleft().result()
            planes = self.segmenter.forward([d.frame for d in good]) if good else []
            planes_of = iter(planes)
            for d in ready:
                if d.image is None:
                    finished.append(ImageResult(d.image_id, error=d.error))
                else:
                    d.frame = None  # the network is done with it
                    future = self.pool.submit(self._finish, d, next(planes_of))
                    pending.append(future)
                    finished.append(future)
            del ready, good, planes, planes_of
        return [f.result() if isinstance(f, Future) else f for f in finished]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
