"""Overlays rendered on request (OVERLAYS=lazy, the API) are the very bytes the
worker writes when they are eager, for every kind of upload; the lazy pipeline
leaves everything else as it was."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.checkpoint import load_checkpoint
from model.inference import Segmenter
from tests.unit.test_dicom import make_cr, to_bytes
from training.synthetic import synthetic_jpegs
from worker.decode import DecodeError
from worker.overlay import render_overlay_png
from worker.pipeline import Pipeline

from model.checkpoint import SYNTHETIC_CHECKPOINT as SYNTHETIC_DEMO


def png16(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((90, 120)) * 4000).astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter(load_checkpoint(SYNTHETIC_DEMO), device="cpu", batch_size=4)


def test_lazy_overlays_equal_eager_ones_for_jpeg_png16_and_dicom(segmenter):
    files, _ = synthetic_jpegs(4, seed=5, sides=(200, 400))
    files += [("scan16.png", png16(1)), ("cr.dcm", to_bytes(make_cr()))]
    items = [(name, (lambda data=data: data)) for name, data in files]
    eager, lazy = Pipeline(segmenter, threads=2), Pipeline(segmenter, threads=2, overlays=False)
    try:
        with_overlays, without = eager.run(items), lazy.run(items)
    finally:
        eager.close(), lazy.close()
    tumors = 0
    for (name, data), e, z in zip(files, with_overlays, without):
        assert e.ok and z.ok, (name, e.error, z.error)
        assert z.overlay_png is None and e.overlay_png is not None
        assert (z.mask_png, z.stats) == (e.mask_png, e.stats), "only the overlay moves"
        assert (z.seg_dcm is None) == (e.seg_dcm is None) == (not name.endswith(".dcm"))  # new UIDs each time
        assert render_overlay_png(data, e.mask_png) == e.overlay_png, name
        tumors += e.stats.tumor_detected
    assert tumors >= 3, "the comparison covers tinted and outlined tumors, not only plain images"


def test_render_refuses_what_it_cannot_read():
    files, _ = synthetic_jpegs(1, seed=6, sides=(200, 300))
    data = files[0][1]
    with pytest.raises(DecodeError):
        render_overlay_png(data[: len(data) // 4] + b"\0", b"")  # a truncated upload
    with pytest.raises(ValueError, match="mask"):
        render_overlay_png(data, b"not a png")
    mask = io.BytesIO()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask, "PNG")
    with pytest.raises(ValueError, match="does not match"):
        render_overlay_png(data, mask.getvalue())


def test_overlays_setting_defaults_to_lazy_and_reaches_the_worker_processes():
    from bonedetect.local import settings_env
    from bonedetect.settings import Settings

    assert (Settings.from_env({}).overlays, Settings.from_env({}).torch_compile) == ("lazy", "auto")
    eager = Settings.from_env({"OVERLAYS": " Eager ", "IO_THREADS": "7", "LOG_LEVEL": "DEBUG", "TORCH_COMPILE": "off"})
    assert eager.overlays == "eager"
    env = settings_env(eager)
    assert (env["OVERLAYS"], env["IO_THREADS"], env["LOG_LEVEL"], env["TORCH_COMPILE"]) == ("eager", "7", "DEBUG", "off")
    assert Settings.from_env(env).overlays == "eager"
    with pytest.raises(ValueError, match="OVERLAYS must be one of lazy, eager"):
        Settings.from_env({"OVERLAYS": "sometimes"})
    assert Settings.from_env({"INFER_TTA": "flip"}).infer_tta == "flip" and settings_env(eager)["INFER_TTA"] == "auto"
    with pytest.raises(ValueError, match="TORCH_COMPILE must be one of auto, on, off"):
        Settings.from_env({"TORCH_COMPILE": "yes"})
