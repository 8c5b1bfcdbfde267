"""The per-chunk inference pipeline: bytes in, masks, overlays and statistics out.

    read + decode (thread pool) -> batched network (Segmenter) -> postprocess,
    statistics, PNG encoding (thread pool)

Decoding of the next batch runs while the network works on the current one.
One bad image never fails its chunk: it gets an ImageResult with its reason.
The benchmark runs this same class, so what is measured is what runs.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

from model.inference import Segmenter
from model.postprocess import render_overlay
from model.stats import TumorStats, tumor_statistics
from worker.decode import DecodedImage, DecodeError, decode_image


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

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Decoded:
    image_id: str
    started: float
    image: DecodedImage | None = None
    error: str | None = None


def encode_png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


class Pipeline:
    def __init__(self, segmenter: Segmenter, max_pixels: int = 100_000_000, threads: int = 4):
        self.segmenter = segmenter
        self.max_pixels = max_pixels
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bonedetect-io")

    def _decode(self, image_id: str, read: Callable[[], bytes]) -> _Decoded:
        item = _Decoded(image_id, time.perf_counter())
        try:
            data = read()
        except Exception as err:  # a blob that cannot be read fails alone
            item.error = f"could not read the uploaded file: {err}"
            return item
        try:
            item.image = decode_image(data, self.max_pixels)
        except DecodeError as err:
            item.error = str(err)
        except Exception as err:  # a decoder bug must not fail the chunk either
            item.error = f"not a decodable image: {type(err).__name__}: {err}"
        return item

    def _finish(self, item: _Decoded, prob: np.ndarray, mask: np.ndarray) -> ImageResult:
        image = item.image
        assert image is not None
        h, w = image.pixels.shape
        try:
            stats = tumor_statistics(mask, prob, image.pixel_spacing_mm)
            overlay = render_overlay(image.pixels, mask)
            return ImageResult(
                image_id=item.image_id,
                width=w,
                height=h,
                stats=stats,
                mask_png=encode_png(mask * np.uint8(255)),
                overlay_png=encode_png(cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR)),
                pixel_spacing_mm=image.pixel_spacing_mm,
                spacing_source=image.spacing_source,
                processing_ms=(time.perf_counter() - item.started) * 1000.0,
            )
        except Exception as err:
            return ImageResult(item.image_id, error=f"postprocessing failed: {err}", width=w, height=h)

    def run(self, items: Sequence[tuple[str, Callable[[], bytes]]]) -> list[ImageResult]:
        """Process (image_id, read_bytes) pairs; results come back in input order."""
        batch = max(1, self.segmenter.batch_size)
        decoded: list[Future[_Decoded]] = [self.pool.submit(self._decode, i, r) for i, r in items[:batch]]
        finished: list[Future[ImageResult] | ImageResult] = []
        for start in range(0, len(items), batch):
            current = decoded[start : start + batch]
            # Queue the next batch's decoding before the network starts on this one.
            nxt = items[start + batch : start + 2 * batch]
            decoded.extend(self.pool.submit(self._decode, i, r) for i, r in nxt)
            ready = [f.result() for f in current]
            good = [d for d in ready if d.image is not None]
            predictions = self.segmenter.predict([d.image.pixels for d in good]) if good else []
            preds = iter(predictions)
            for d in ready:
                if d.image is None:
                    finished.append(ImageResult(d.image_id, error=d.error))
                else:
                    p = next(preds)
                    finished.append(self.pool.submit(self._finish, d, p.prob, p.mask))
            del ready, good, predictions, preds
        return [f.result() if isinstance(f, Future) else f for f in finished]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
