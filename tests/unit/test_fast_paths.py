"""The throughput work must not change a single result: the cropped
postprocessing equals Postprocessor's, the fast PNG writer is lossless, the
pipeline's prefetch and backpressure settings do not change its output, and
the optional GPU JPEG decoder falls back to the CPU for everything it cannot
take (this machine has no GPU: a CPU stand-in plays nvJPEG)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import worker.png as png_module
from model.checkpoint import load_checkpoint, save_checkpoint
from model.inference import Segmenter, postprocess_cropped
from model.network import AttentionUNet, UNetConfig
from model.postprocess import Postprocessor
from model.preprocess import Preprocessor
from worker.decode import DecodedImage, DecodeError, decode_image
from worker.gpu_decode import GpuJpegDecoder, gpu_decode_unavailable, select_decoder
from worker.pipeline import Pipeline, encode_png

# -- postprocessing inside the bounding box ------------------------------------------------


def blobs(rng, h, w, n):
    """A probability map with n soft blobs, some with holes, some on the border."""
    yy, xx = np.mgrid[0:h, 0:w]
    prob = rng.random((h, w)).astype(np.float32) * 0.3
    for _ in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, max(3, min(h, w) // 4))
        d = np.hypot(yy - cy, xx - cx)
        prob = np.maximum(prob, np.where(d < r, 0.9, 0.0).astype(np.float32))
        prob[(d < r / 3)] = 0.1  # a hole
    return prob


@pytest.mark.parametrize("seed", range(12))
def test_cropped_postprocessing_equals_postprocessor(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 300)), int(rng.integers(20, 300))
    prob = blobs(rng, h, w, int(rng.integers(0, 6)))
    for post in (Postprocessor(0.5), Postprocessor(0.25, min_region_fraction=0.002), Postprocessor(0.5, fill_holes=False), Postprocessor(0.5, 0.0)):
        np.testing.assert_array_equal(postprocess_cropped(post, prob), post(prob))


def test_cropped_postprocessing_edge_cases():
    post = Postprocessor(0.5, min_region_fraction=0.01)
    empty = np.zeros((50, 40), np.float32)
    full = np.ones((50, 40), np.float32)
    ring = full.copy()
    ring[10:40, 10:30] = 0  # a hole as large as most of the image: filled
    frame = full.copy()
    frame[1:-1, 1:-1] = 0  # positive only on the image border: the inside is a hole
    speck = empty.copy()
    speck[5, 5] = 1  # below the minimum area: removed
    for prob in (empty, full, ring, frame, speck):
        got = postprocess_cropped(post, prob)
        np.testing.assert_array_equal(got, post(prob))
        assert got.dtype == np.uint8 and got.shape == prob.shape
    with pytest.raises(ValueError, match="probability map"):
        postprocess_cropped(post, np.zeros((3, 3, 3), np.float32))


# -- PNG -----------------------------------------------------------------------------------


@pytest.fixture(params=["isal", "libpng"])
def png_writer(request, monkeypatch):
    """Each PNG test twice: with ISA-L's deflate (the worker's), and with OpenCV's libpng where isal is missing."""
    if request.param == "libpng":
        monkeypatch.setattr(png_module, "isal_zlib", None)
    elif png_module.isal_zlib is None:
        pytest.skip("isal is not installed")
    return request.param


def test_png_is_lossless_for_gray_rgb_and_rgba(png_writer):
    rng = np.random.default_rng(0)
    for shape in ((37, 51), (1, 1), (64, 33, 3), (20, 17, 4)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        png = encode_png(image)
        back = np.array(Image.open(io.BytesIO(png)))
        np.testing.assert_array_equal(back, image)  # PIL: RGB order, like the input
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), np.uint16))


def decoded_both_ways(png: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A PNG read by PIL and by OpenCV (libpng), as arrays."""
    return np.array(Image.open(io.BytesIO(png))), cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("zeros", [None, 1000], ids=["zeros in one block", "zeros in pieces"])
def test_mask_png_from_its_windows_is_the_masks_image(png_writer, zeros, monkeypatch):
    from worker.png import encode_mask_png

    if zeros:  # a block of zeros smaller than the zero rows (the worker's is 1 MiB): fed in pieces
        monkeypatch.setattr(png_module, "_ZEROS", np.zeros(zeros, np.uint8))
    rng = np.random.default_rng(7)
    h, w = 1100, 301
    cases = []
    for top, bottom in ((0, 40), (h - 30, h), (500, 501), (0, h), (10, 20), (900, 1000)):
        mask = np.zeros((h, w), np.uint8)
        mask[top:bottom, 50:80] = rng.random((bottom - top, 30)) < 0.6
        mask[top, 50] = mask[bottom - 1, 79] = 1  # the band's first and last rows hold tumor
        cases.append((mask, [(top, bottom, 40, 90)]))
    two = np.zeros((h, w), np.uint8)
    two[5:9, 0:3] = 1
    two[1090:1100, 290:301] = 1
    cases.append((two, [(1080, 1100, 280, 301), (0, 12, 0, 10)]))  # in any order
    cases.append((np.zeros((h, w), np.uint8), []))  # nothing found
    cases.append((np.ones((1, 1), np.uint8), [(0, 1, 0, 1)]))
    for mask, windows in cases:
        for given in (windows, None):  # None: the mask's own bounding box
            png = encode_mask_png(mask, given)
            for back in decoded_both_ways(png):
                assert back.dtype == np.uint8 and np.array_equal(back, mask * 255)
            assert png == encode_mask_png(mask, given)
    beyond = np.zeros((10, 8), np.uint8)
    beyond[8:, 6:] = 1
    for windows in ([(8, 30, 6, 20)], [(12, 30, 0, 8), (8, 10, 6, 8)]):  # windows past the image's edge
        assert all(np.array_equal(back, beyond * 255) for back in decoded_both_ways(encode_mask_png(beyond, windows)))
    empty = np.zeros((10, 8), np.uint8)
    assert all(not back.any() for back in decoded_both_ways(encode_mask_png(empty, [(12, 30, 0, 8)])))
    with pytest.raises(ValueError, match="uint8"):
        encode_mask_png(np.zeros((4, 4), bool))


# -- the pipeline --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, AttentionUNet(UNetConfig(filters=(4, 8, 16))), preprocessor=Preprocessor(32, 0.5, 0.25),
                    postprocessor=Postprocessor(threshold=0.5), version="tiny", label="random weights")
    return Segmenter(load_checkpoint(path), device="cpu", batch_size=2)


def jpeg(seed: int, h: int, w: int, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, "JPEG")
    return buf.getvalue()


def test_prefetch_and_backpressure_do_not_change_results(segmenter):
    files = [jpeg(i, 30 + 7 * i, 40 + 3 * i) for i in range(7)]
    files.insert(3, b"not an image")
    items = [(f"i{k}", (lambda d=d: d)) for k, d in enumerate(files)]
    outputs = []
    for kwargs in ({}, {"prefetch_batches": 1, "max_pending": 1, "threads": 1}, {"prefetch_batches": 4, "threads": 3}):
        pipe = Pipeline(segmenter, gpu_decode="off", **kwargs)
        try:
            outputs.append(pipe.run(items))
        finally:
            pipe.close()
    first = outputs[0]
    assert [r.image_id for r in first] == [i for i, _ in items]
    assert not first[3].ok and first[3].error and all(r.ok for k, r in enumerate(first) if k != 3)
    for other in outputs[1:]:
        for a, b in zip(first, other):
            assert (a.image_id, a.error, a.stats, a.mask_png) == (b.image_id, b.error, b.stats, b.mask_png)


def test_pipeline_masks_equal_segmenter_predict(segmenter):
    images = [np.array(Image.open(io.BytesIO(jpeg(i, 50, 70)))) for i in range(3)]
    pipe = Pipeline(segmenter, gpu_decode="off")
    try:
        results = pipe.run([(f"i{k}", (lambda d=jpeg(k, 50, 70): d)) for k in range(3)])
    finally:
        pipe.close()
    for r, pred in zip(results, segmenter.predict(images)):
        np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(r.mask_png))), pred.mask * 255)


# -- GPU JPEG decoding and its fallback --------------------------------------------------------


def test_gpu_decode_setting_falls_back_to_the_cpu_here():
    assert select_decoder("off", "cpu") is decode_image
    assert select_decoder("auto", "cpu") is decode_image
    assert select_decoder(" AUTO ", "cpu") is decode_image
    with pytest.raises(ValueError, match="GPU_DECODE=on.*not CUDA"):
        select_decoder("on", "cpu")
    with pytest.raises(ValueError, match="auto, on, off"):
        select_decoder("gpu", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_without_cuda_auto_decodes_on_the_cpu_and_on_says_why_not(segmenter):
    assert gpu_decode_unavailable("cuda") == "CUDA is not available"
    assert select_decoder("auto", "cuda") is decode_image
    with pytest.raises(ValueError, match="GPU_DECODE=on.*runs on cpu, not CUDA"):  # the segmenter is on the CPU
        Pipeline(segmenter, gpu_decode="on")
    assert Pipeline(segmenter, gpu_decode="auto").decode is decode_image


def test_gpu_decode_settings_are_read_once_and_reach_the_workers_pipeline(tmp_path):
    """GPU_DECODE and GPU_DECODE_BATCH are settings like the others: checked when they are read (the API and
    the worker refuse a value they do not know), passed to worker processes, and the worker builds its
    pipeline from them."""
    from bonedetect.local import settings_env
    from bonedetect.settings import Settings
    from model.checkpoint import SYNTHETIC_CHECKPOINT
    from worker.tasks import build_context

    default = Settings.from_env({})
    assert (default.gpu_decode, default.gpu_decode_batch) == ("auto", "on")
    chosen = Settings.from_env({"GPU_DECODE": " Off", "GPU_DECODE_BATCH": "OFF"})
    assert (chosen.gpu_decode, chosen.gpu_decode_batch) == ("off", "off")
    passed = Settings.from_env(settings_env(chosen))
    assert (passed.gpu_decode, passed.gpu_decode_batch) == ("off", "off")
    with pytest.raises(ValueError, match="GPU_DECODE_BATCH must be one of on, off, got '16'"):
        Settings.from_env({"GPU_DECODE_BATCH": "16"})
    with pytest.raises(ValueError, match="GPU_DECODE must be one of auto, on, off, got 'nvjpeg'"):
        Settings.from_env({"GPU_DECODE": "nvjpeg"})

    # the worker's own construction, on this machine's CPU (ALLOCATOR=system and OPENCV_THREADS=0 leave this
    # test process's allocator and OpenCV as they are)
    env = {"BONEDETECT_HOME": str(tmp_path), "MODEL_CHECKPOINT": str(SYNTHETIC_CHECKPOINT), "TORCH_COMPILE": "off",
           "ALLOCATOR": "system", "OPENCV_THREADS": "0", "INFER_TTA": "off", "OVERLAYS": "eager"}
    for decode, batch in (("auto", "on"), ("off", "off")):
        ctx = build_context(Settings.from_env({**env, "GPU_DECODE": decode, "GPU_DECODE_BATCH": batch}))
        try:
            on_gpu = decode == "auto" and gpu_decode_unavailable(ctx.pipeline.segmenter.device) is None
            if on_gpu:  # a CUDA host with torchvision's nvJPEG
                assert isinstance(ctx.pipeline.decode, GpuJpegDecoder)
            else:  # off, or auto where the network is on the CPU
                assert ctx.pipeline.decode is decode_image
            assert ctx.pipeline.gpu_decode_batch is (batch == "on")
        finally:
            ctx.pipeline.close()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="GPU_DECODE=on, but JPEGs cannot be decoded on the GPU"):
            build_context(Settings.from_env({**env, "GPU_DECODE": "on"}))


def cpu_stand_in(data: torch.Tensor) -> torch.Tensor:
    """Plays torchvision.io.decode_jpeg(..., mode=GRAY): (1, H, W) uint8, or raises."""
    pixels = cv2.imdecode(data.numpy(), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise RuntimeError("nvjpeg: bitstream error")
    return torch.from_numpy(pixels)[None]


def test_gpu_decoder_takes_plain_jpegs_and_leaves_the_rest_to_the_cpu():
    decoder = GpuJpegDecoder("cuda", gpu_decode=cpu_stand_in)
    gray, rgb = jpeg(1, 60, 80), jpeg(2, 40, 30, "RGB")
    for data in (gray, rgb):
        got = decoder(data)
        assert got.format == "JPEG" and isinstance(got.pixels, torch.Tensor) and got.pixels.dtype == torch.uint8
        assert np.abs(got.pixels.numpy().astype(int) - decode_image(data).pixels.astype(int)).max() <= 2
    assert (decoder.gpu_images, decoder.cpu_images) == (2, 0)
    host = GpuJpegDecoder("cuda", gpu_decode=cpu_stand_in, keep_on_device=False)(gray).pixels
    assert isinstance(host, np.ndarray) and host.dtype == np.uint8 and host.shape == (60, 80)

    png = io.BytesIO()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(png, "PNG")
    assert decoder(png.getvalue()).format == "PNG"  # not a JPEG: the CPU decoder
    cmyk = jpeg(3, 20, 20, "CMYK")
    assert decoder(cmyk).pixels.shape == (20, 20)  # CMYK: the CPU decoder
    with pytest.raises(DecodeError, match="truncated"):  # the stand-in refuses it, the CPU gives the reason
        decoder(gray[: len(gray) // 2])
    with pytest.raises(DecodeError, match="above the limit"):
        decoder(gray, 100)
    with pytest.raises(DecodeError, match="smaller than the minimum"):
        decoder(jpeg(4, 8, 40))
    assert (decoder.gpu_images, decoder.cpu_images) == (2, 5)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": nvJPEG on CUDA would not
    Image.fromarray(np.zeros((30, 50), np.uint8)).save(rotated, "JPEG", exif=exif)
    got = decoder(rotated.getvalue())
    assert isinstance(got.pixels, np.ndarray) and got.pixels.shape == (50, 30), "Pillow decoded and rotated it"
    assert (decoder.gpu_images, decoder.cpu_images) == (2, 6)


class BatchStandIn:
    """Plays torchvision.io.decode_jpeg(list, mode=GRAY) on the GPU: one call for the list, which fails as a whole
    when nvJPEG refuses one of its files (torchvision checks each and raises); records each call's size."""

    def __init__(self, refuse: set[int] = frozenset()):
        self.refuse, self.calls = refuse, []

    def one(self, data: torch.Tensor) -> torch.Tensor:
        if len(data) in self.refuse:
            raise RuntimeError("nvjpeg: unsupported bitstream")
        return cpu_stand_in(data)

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls.append(len(tensors))
        return [self.one(t) for t in tensors]


def test_batched_gpu_decoding_with_one_thread_and_with_two_chunks_at_once(segmenter):
    """The batch's decoding task waits on its reads in the pool they share: with one thread, and with two chunks
    run at once (WORKER_CONCURRENCY 2) on one pool, it finishes, and gives what one call per image gives; a
    reader that hands back something other than bytes fails its own image only."""
    from concurrent.futures import ThreadPoolExecutor

    files = [jpeg(30 + i, 40 + 3 * i, 60) for i in range(7)]
    files.insert(2, files[0][:150])  # truncated: the CPU decoder says why
    items = [(f"i{k}", (lambda d=d: d)) for k, d in enumerate(files)]
    items.insert(5, ("not-bytes", lambda: memoryview(files[1])))

    def run(threads, together, concurrently):
        pipeline = Pipeline(segmenter, threads=threads, gpu_decode="off", gpu_decode_batch=together)
        batch = BatchStandIn()
        pipeline.decode = GpuJpegDecoder("cpu", gpu_decode=cpu_stand_in, gpu_decode_batch=batch)
        try:
            with ThreadPoolExecutor(2) as runs:
                chunks = [runs.submit(pipeline.run, items) for _ in range(2 if concurrently else 1)]
                results = [chunk.result(timeout=120) for chunk in chunks]  # a deadlock fails here, not forever
        finally:
            pipeline.close()
        return results, batch.calls

    def summary(results):
        return [(r.image_id, r.error is None, r.mask_png, r.stats and r.stats.area_px) for r in results]

    (want,), calls = run(2, False, False)
    assert calls == [] and [r.ok for r in want] == [True, True, False, True, True, False, True, True, True]
    assert "truncated" in want[2].error and want[5].error.startswith("not a decodable image")
    for threads in (1, 3):
        got, calls = run(threads, True, True)
        assert [summary(r) for r in got] == [summary(want)] * 2
        # batches [i0, i1], [i2 truncated, i3], [i4, not bytes], [i5, i6], [i7]: one call each for the two whose
        # files are both plain JPEGs, per chunk; a lone plain JPEG is decoded by itself
        assert calls == [2] * 4


def progressive_jpeg(seed: int, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)).save(buf, "JPEG", progressive=True)
    return buf.getvalue()


def test_gpu_decoder_decodes_a_batch_in_one_call_and_a_refused_file_alone():
    files = [jpeg(10 + i, 40 + i, 50) for i in range(4)]
    batch = BatchStandIn()
    decoder = GpuJpegDecoder("cuda", gpu_decode=batch.one, gpu_decode_batch=batch)
    assert all(decoder.takes(f, 10**8) for f in files)
    got = decoder.decode_batch(files)
    assert batch.calls == [4] and (decoder.gpu_images, decoder.cpu_images) == (4, 0)
    for data, image in zip(files, got):
        assert isinstance(image.pixels, torch.Tensor) and image.format == "JPEG"
        assert np.abs(image.pixels.numpy().astype(int) - decode_image(data).pixels.astype(int)).max() <= 2

    # nvJPEG refuses one file: the call fails, so each file is decoded alone; that one on the CPU
    batch = BatchStandIn(refuse={len(files[2])})
    decoder = GpuJpegDecoder("cuda", gpu_decode=batch.one, gpu_decode_batch=batch)
    got = decoder.decode_batch(files)
    assert batch.calls == [4] and (decoder.gpu_images, decoder.cpu_images) == (3, 1)
    assert [isinstance(image.pixels, torch.Tensor) for image in got] == [True, True, False, True]
    np.testing.assert_array_equal(got[2].pixels, decode_image(files[2]).pixels)
    # a file nothing decodes comes back as the CPU decoder's error, the others decoded
    broken = files[1][: files[1].index(b"\xff\xda")] + b"\xff\xd9"  # the header, then the end: no picture
    batch = BatchStandIn(refuse={len(broken)})
    decoder = GpuJpegDecoder("cuda", gpu_decode=batch.one, gpu_decode_batch=batch)
    assert decoder.takes(broken, 10**8)
    got = decoder.decode_batch([files[0], broken])
    assert isinstance(got[0], DecodedImage) and isinstance(got[0].pixels, torch.Tensor)
    with pytest.raises(DecodeError) as cpu_error:
        decode_image(broken)
    assert isinstance(got[1], DecodeError) and str(got[1]) == str(cpu_error.value)
    # progressive JPEGs stay on the CPU: torchvision decodes them on one core under its lock
    progressive = progressive_jpeg(5, 64, 48)
    assert not decoder.takes(progressive, 10**8) and decoder.takes(files[0], 10**8)
    before = decoder.cpu_images
    assert isinstance(decoder(progressive).pixels, np.ndarray) and decoder.cpu_images == before + 1


@pytest.mark.skipif(gpu_decode_unavailable("cuda") is not None, reason="needs CUDA and torchvision's nvJPEG")
def test_nvjpeg_decodes_a_batch_as_it_decodes_each_file():
    """torchvision's decode_jpeg on a list (the JPEG engines, where the GPU has them) against one file per call
    and against Pillow: gray and RGB files of several sizes, 4:2:0 and 4:4:4."""
    files = [jpeg(20 + i, 250 + 37 * i, 300 - 21 * i, "RGB" if i % 2 else "L") for i in range(5)]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(buf, "JPEG", subsampling=0)
    files.append(buf.getvalue())
    decoder = GpuJpegDecoder("cuda")
    together = decoder.decode_batch(files)
    assert decoder.gpu_images == len(files), "all of them in one call"
    for data, image in zip(files, together):
        alone = decoder(data).pixels.cpu().numpy().astype(int)
        got = image.pixels.cpu().numpy().astype(int)
        np.testing.assert_array_equal(got, alone)
        assert np.abs(got - decode_image(data).pixels.astype(int)).max() <= 2


@pytest.mark.parametrize("shape", [(2500, 3000), (1000, 777), (300, 200), (64, 64), (40, 300)])
def test_frames_prepared_from_a_tensor_equal_opencvs(shape):
    """Preprocessor.prepare_tensor (pixels decoded on the GPU) resamples as OpenCV does: INTER_AREA to shrink."""
    from model.preprocess import area_taps

    rng = np.random.default_rng(shape[0])
    pixels = cv2.GaussianBlur(rng.integers(0, 256, shape).astype(np.uint8), (0, 0), 3)
    pixels[shape[0] // 3 :, : shape[1] // 2] = 250  # a sharp edge, where area weights matter most
    pre = Preprocessor(128, 0.3, 0.2)
    want, g = pre(pixels)
    got, g2 = pre.prepare_tensor(torch.from_numpy(pixels))
    assert g2 == g and got.dtype == torch.float32 and tuple(got.shape) == (128, 128)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-5)
    for dst, src in ((5, 13), (427, 2500), (512, 3000), (3, 3), (7, 8)):
        index, weights = area_taps(dst, src)
        torch.testing.assert_close(weights.sum(1), torch.ones(dst))
        assert index.min() >= 0 and index.max() < src and (weights >= 0).all()
        dense = torch.zeros(dst, src).index_put_((torch.arange(dst)[:, None].expand_as(index), index), weights, accumulate=True)
        inside = torch.arange(src)[None, :] + 1 > torch.arange(dst)[:, None] * src / dst  # the pixels each one overlaps
        inside &= torch.arange(src)[None, :] < (torch.arange(dst)[:, None] + 1) * src / dst
        assert ((dense > 0) == inside).all(), "every pixel it overlaps, and no other"
    with pytest.raises(ValueError, match="uint8"):
        pre.prepare_tensor(torch.zeros((4, 4), dtype=torch.int16))


@pytest.mark.parametrize("overlays", [True, False], ids=["eager", "lazy"])
@pytest.mark.parametrize("device_prepare_fails", [False, True], ids=["", "prepare-falls-back"])
@pytest.mark.parametrize("together", [True, False], ids=["batched", "one-by-one"])
def test_pipeline_with_pixels_left_on_the_device_gives_the_cpu_results(overlays, device_prepare_fails, together,
                                                                      monkeypatch):
    """GPU_DECODE's path end to end, with a CPU stand-in for nvJPEG: the frames are prepared from tensors
    (or, when that fails, as out of GPU memory would, on the host); a batch's plain JPEGs decoded in one call
    (GPU_DECODE_BATCH=on, the default) or one call each."""
    from model.checkpoint import SYNTHETIC_CHECKPOINT
    from training.synthetic import synthetic_jpegs

    files, _ = synthetic_jpegs(5, seed=8, sides=(300, 700))
    files.append(("truncated.jpg", files[0][1][:200]))
    items = [(name, (lambda data=data: data)) for name, data in files]
    segmenter = Segmenter(load_checkpoint(SYNTHETIC_CHECKPOINT), device="cpu", batch_size=2)
    cpu_path = Pipeline(segmenter, threads=2, gpu_decode="off")
    device_path = Pipeline(segmenter, threads=2, gpu_decode="off", overlays=overlays, gpu_decode_batch=together)
    batch = BatchStandIn()
    decoder = GpuJpegDecoder("cpu", gpu_decode=cpu_stand_in, gpu_decode_batch=batch)
    device_path.decode = decoder
    if device_prepare_fails:
        def out_of_memory(pixels):
            raise RuntimeError("CUDA out of memory")

        monkeypatch.setattr(segmenter.preprocessor, "prepare_tensor", out_of_memory)
    try:
        a, b = cpu_path.run(items), device_path.run(items)
    finally:
        cpu_path.close(), device_path.close()
    assert decoder.gpu_images == 5 and not b[-1].ok and "truncated" in b[-1].error
    # batches of 2: [0, 1], [2, 3], [4, truncated]: the truncated file goes to the CPU, so 4 is decoded alone
    assert batch.calls == ([2, 2] if together else []), "one call per batch, of its plain JPEGs"
    for x, y in zip(a[:-1], b[:-1]):
        assert x.ok and y.ok and (x.width, x.height) == (y.width, y.height)
        mx = cv2.imdecode(np.frombuffer(x.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE) > 0
        my = cv2.imdecode(np.frombuffer(y.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE) > 0
        assert (mx ^ my).sum() <= 0.02 * max(1, mx.sum()), "the same masks (OpenCV's and the stand-in's JPEG decoders differ by a gray level)"
        assert (y.overlay_png is not None) == overlays and abs(x.stats.area_px - y.stats.area_px) <= 0.02 * max(1, x.stats.area_px)


# -- statistics and overlay inside the bounding box --------------------------------------------


def whole_image_statistics(mask, prob, spacing):
    """The whole-image statistics the bounding-box version replaced (the reference)."""
    inside = mask != 0
    ys, xs = np.nonzero(inside)
    if ys.size == 0:
        return None
    n_labels, _ = cv2.connectedComponents(inside.astype(np.uint8), connectivity=8)
    prob_in = np.asarray(prob, np.float64)[inside]
    return dict(area_px=int(ys.size), area_fraction=ys.size / mask.size, area_mm2=ys.size * spacing[0] * spacing[1],
                bbox_x=int(xs.min()), bbox_y=int(ys.min()), bbox_w=int(xs.max() - xs.min() + 1),
                bbox_h=int(ys.max() - ys.min() + 1), centroid_x=float(xs.mean()), centroid_y=float(ys.mean()),
                n_regions=n_labels - 1, prob_max=float(prob_in.max()), prob_mean=float(prob_in.mean()))


def whole_image_overlay(pixels, mask):
    """The whole-image overlay the bounding-box version replaced (the reference)."""
    from model.postprocess import OVERLAY_COLOR, OVERLAY_FILL_ALPHA
    from model.preprocess import to_unit_float

    unit = to_unit_float(pixels)
    gray = np.round(unit * 255).astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    inside = mask != 0
    if not inside.any():
        return rgb
    color = np.asarray(OVERLAY_COLOR, np.float32)
    rgb[inside] = np.round((1 - OVERLAY_FILL_ALPHA) * rgb[inside] + OVERLAY_FILL_ALPHA * color).astype(np.uint8)
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, OVERLAY_COLOR, thickness=max(1, round(max(unit.shape) / 256)))
    return rgb


@pytest.mark.parametrize("seed", range(16))
def test_box_statistics_and_overlay_equal_the_whole_image_versions(seed):
    from model.postprocess import render_overlay
    from model.stats import tumor_statistics

    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(40, 700)), int(rng.integers(40, 700))
    prob = blobs(rng, h, w, int(rng.integers(0, 4)))
    mask = postprocess_cropped(Postprocessor(0.5, 0.0, fill_holes=bool(seed % 2)), prob)
    if seed % 3 == 0:
        mask[0, :] = 1  # touching the border
    if seed >= 12:  # an untrained network's speckle over the whole image: the worst case for the box
        mask = (rng.random((h, w)) < (0.05, 0.5, 0.9, 0.3)[seed - 12]).astype(np.uint8)
    dtype = (np.uint8, np.uint16, np.float32)[seed % 3]
    pixels = (rng.random((h, w)) * (255 if dtype is np.uint8 else 4000)).astype(dtype)
    spacing = (0.14, 0.16)
    got = tumor_statistics(mask, prob, spacing)
    want = whole_image_statistics(mask, prob, spacing)
    if want is None:
        assert not got.tumor_detected and got.area_px == 0 and got.area_mm2 == 0.0
    else:
        # exactly, but for the mean probability, which OpenCV sums in another order than numpy (1e-16)
        mean = want.pop("prob_mean")
        assert {k: getattr(got, k) for k in want} == want
        assert got.prob_mean == pytest.approx(mean, rel=1e-12, abs=0)
    assert np.array_equal(render_overlay(pixels, mask), whole_image_overlay(pixels, mask))


# -- restoring only the window where the tumor can be ------------------------------------------


def small_lesions(rng, size: int, n: int, g) -> np.ndarray:
    """A frame of background noise with n small soft lesions on the image's part of it (geometry g),
    close together (one small window), the first with a hole, the second on the image's top edge."""
    yy, xx = np.mgrid[0:size, 0:size]
    plane = (rng.random((size, size)) * 0.3).astype(np.float32)
    cy0 = g.top + int(rng.integers(0, max(1, g.scaled_h // 3)))
    cx0 = g.left + int(rng.integers(0, g.scaled_w))
    for k in range(n):
        cy = g.top if k == 1 else min(g.top + g.scaled_h - 1, cy0 + int(rng.integers(0, 6)))
        cx = int(np.clip(cx0 + rng.integers(-6, 7), g.left, g.left + g.scaled_w - 1))
        r = float(rng.uniform(2, size / 12))
        d = np.hypot(yy - cy, xx - cx)
        plane = np.maximum(plane, np.clip(1.2 - d / r, 0, 0.95).astype(np.float32))
        if k == 0:
            plane[d < r / 4] = 0.1  # a hole: filled when the postprocessor fills holes
    return plane


@pytest.mark.parametrize("seed", range(16))
def test_windowed_finish_equals_the_full_restore_where_it_matters(seed, monkeypatch):
    import model.inference as inference
    from model.inference import Segmenter, restore_window, window_bounds, windows

    rng = np.random.default_rng(seed)
    size = 64
    h, w = int(rng.integers(size, 1200)), int(rng.integers(size, 1200))
    if seed == 0:
        h, w = 2 * size, 4 * size  # exact integer factors
    geometry = Preprocessor(size).geometry(h, w)
    plane = small_lesions(rng, size, 0 if seed == 1 else 1 + seed % 3, geometry)
    post = Postprocessor(threshold=0.5, min_region_fraction=float(rng.choice([0.0, 1e-3])), fill_holes=seed % 4 != 3)
    seg = Segmenter.__new__(Segmenter)  # finish/finish_windowed use the postprocessor only
    seg.postprocessor = post
    calls = []
    monkeypatch.setattr(inference, "restore_window", lambda *a: calls.append(1) or restore_window(*a))
    exact, fast = seg.finish(plane, geometry), seg.finish_windowed(plane, geometry)
    assert fast.mask.shape == exact.mask.shape == fast.prob.shape == (h, w) and fast.mask.dtype == np.uint8
    bounds = window_bounds(plane, geometry, post.threshold)
    found = windows(plane, geometry, post.threshold)
    small = bool(found) and sum(b[3] - b[2] for b in found) < w
    assert len(calls) == (len(found) if small else 0), "windows narrower than the image in all are restored apart"
    assert small or seed in (1,), f"these inputs exercise the windowed path (1: none), {found}"
    assert same_mask(fast, exact, post.threshold)
    assert seed == 1 or exact.mask.any()
    inside = fast.mask > 0
    np.testing.assert_allclose(fast.prob[inside], exact.prob[inside], rtol=0, atol=RESTORE_ATOL)
    assert (exact.prob[fast.prob == 0] <= post.threshold + 1e-6).all(), "nothing above threshold left out"
    if bounds is None:
        assert not exact.mask.any() and not fast.prob.any()
    else:
        top, bottom, left, right = bounds
        np.testing.assert_allclose(restore_window(plane, geometry, bounds), exact.prob[top:bottom, left:right],
                                   rtol=0, atol=RESTORE_ATOL)
        outside = np.ones((h, w), bool)
        outside[top:bottom, left:right] = False
        assert (exact.prob[outside] <= post.threshold + 1e-6).all(), "the window holds everything above threshold"


# OpenCV 4.12, 4.13 and 5.0 restore a window bit for bit as the whole image (two passes, the whole image's
# taps; a single column is resized as two, since OpenCV treats one column apart); 4.10 (older than the project
# needs) differs by up to 3e-8 (measured 2026-11-28). Tolerant in case a later build differs likewise.
RESTORE_ATOL = 1e-6


def same_mask(fast, exact, threshold):
    borderline = np.abs(exact.prob - threshold) <= RESTORE_ATOL
    return np.array_equal(fast.mask[~borderline], exact.mask[~borderline])


def scattered_lesions(rng, size: int, g) -> np.ndarray:
    """A frame with lesions far apart (several windows): solid blobs, a ring with a blob inside its hole
    (one region filled over another), a speck below the smallest kept area, two blobs 2 frame pixels
    apart (one window or two, but never one region cut in two), and noise that comes near the threshold."""
    yy, xx = np.mgrid[0:size, 0:size]
    plane = (rng.random((size, size)) * 0.45).astype(np.float32)
    plane[rng.random((size, size)) < 0.01] = 0.49  # near the threshold alone: windows that find nothing

    def inside(fy, fx):
        return g.top + int(fy * (g.scaled_h - 1)), g.left + int(fx * (g.scaled_w - 1))

    def blob(cy, cx, r):
        d = np.hypot(yy - cy, xx - cx)
        np.maximum(plane, np.clip(1.3 - d / r, 0, 0.95).astype(np.float32), out=plane)

    for _ in range(int(rng.integers(2, 5))):
        blob(*inside(rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95)), float(rng.uniform(1, 3)))
    cy, cx = inside(rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
    d = np.hypot(yy - cy, xx - cx)
    ring = (d > 5) & (d < 7)
    plane[ring] = np.maximum(plane[ring], 0.9)
    blob(cy, cx, 1.2)  # in the ring's hole
    sy, sx = inside(rng.uniform(0, 1), rng.uniform(0, 1))
    plane[sy, sx] = max(plane[sy, sx], 0.7)  # a speck: a few restored pixels
    ty, tx = inside(rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.8))
    plane[ty, tx : tx + 2] = 0.9
    plane[ty, tx + 4 : tx + 6] = 0.9  # 2 frame pixels from the first pair
    return plane


@pytest.mark.parametrize("seed", range(24))
def test_windowed_finish_with_lesions_far_apart_equals_the_full_restore(seed, monkeypatch):
    import model.inference as inference
    from model.inference import Segmenter, restore_window, windows
    from model.stats import tumor_statistics

    rng = np.random.default_rng(100 + seed)
    size = 64
    h, w = int(rng.integers(2 * size, 2400)), int(rng.integers(2 * size, 2400))
    geometry = Preprocessor(size).geometry(h, w)
    plane = scattered_lesions(rng, size, geometry)
    post = Postprocessor(threshold=0.5, min_region_fraction=float(rng.choice([0.0, 2e-4, 1e-3])),
                         fill_holes=seed % 3 != 2)
    seg = Segmenter.__new__(Segmenter)
    seg.postprocessor = post
    found = windows(plane, geometry, post.threshold)
    assert found and all(0 <= t < b <= h and 0 <= l < r <= w for t, b, l, r in found)
    for i, a in enumerate(found):  # disjoint
        for b in found[i + 1 :]:
            assert not (a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3])
    calls = []
    monkeypatch.setattr(inference, "restore_window", lambda *a: calls.append(1) or restore_window(*a))
    exact, fast = seg.finish(plane, geometry), seg.finish_windowed(plane, geometry)
    windowed = sum(b[3] - b[2] for b in found) < w
    assert len(calls) == (len(found) if windowed else 0) and fast.windows == found
    covered = np.zeros((h, w), bool)
    for t, b, l, r in found:
        covered[t:b, l:r] = True
    assert (exact.prob[~covered] <= post.threshold + 1e-6).all(), "the windows hold everything above threshold"
    assert same_mask(fast, exact, post.threshold) and exact.mask.any()
    np.testing.assert_allclose(fast.prob[exact.mask > 0], exact.prob[exact.mask > 0], rtol=0, atol=RESTORE_ATOL)
    # the statistics read only the windows and come out the same (but the mean's summing order: 1e-16)
    got, want = tumor_statistics(fast.mask, fast.prob, windows=fast.windows).as_dict(), tumor_statistics(fast.mask, fast.prob).as_dict()
    assert got.pop("prob_mean") == pytest.approx(want.pop("prob_mean"), rel=1e-12, abs=0)
    assert got == want and got["n_regions"] >= 2
    if post.fill_holes:
        ring_hole = cv2.connectedComponents(exact.mask)[0] < cv2.connectedComponents((exact.prob > 0.5).view(np.uint8))[0]
        assert ring_hole, "the blob in the ring's hole is filled over, in both"


@pytest.mark.parametrize("fill", [True, False])
def test_windows_too_small_to_keep_are_left_out_and_the_mask_stays_the_same(fill):
    """On a large image one frame pixel's window holds fewer pixels than the smallest kept region: left out.
    A speck alone, a speck in a ring's hole (filled over by the ring's window when holes are filled), a
    blob large enough to keep."""
    import model.inference as inference
    from model.inference import Segmenter, windows

    g = Preprocessor(64).geometry(3000, 2500)
    post = Postprocessor(threshold=0.5, min_region_fraction=2e-3, fill_holes=fill)  # 15,000 pixels; a frame pixel's window ~9,000
    plane = np.full((64, 64), 0.2, np.float32)
    yy, xx = np.mgrid[0:64, 0:64]
    d = np.hypot(yy - 20, xx - 30)
    plane[(d > 5) & (d < 7)] = 0.9  # a ring
    plane[20, 30] = 0.9  # a speck in its hole
    plane[50, 12] = 0.9  # a speck alone
    plane[np.hypot(yy - 45, xx - 45) < 4] = 0.9  # a blob
    min_area = inference._min_area(post, 3000 * 2500)
    everything, kept = windows(plane, g, 0.5), windows(plane, g, 0.5, min_area)
    assert len(everything) == 3 and len(kept) == 2  # the lone speck's window goes (the inner one merges with the ring's)
    seg = Segmenter.__new__(Segmenter)
    seg.postprocessor = post
    exact, fast = seg.finish(plane, g), seg.finish_windowed(plane, g)
    assert fast.windows == kept and same_mask(fast, exact, post.threshold)
    assert exact.mask[int(20 * 3000 / 64), int((30 - g.left) * 2500 / g.scaled_w)] == fill  # the hole's centre


@pytest.mark.parametrize("h, w", [(513, 100), (513, 256), (257, 128), (3000, 2500)])
def test_a_window_one_column_wide_is_restored_as_the_whole_image(h, w):
    """OpenCV resizes a single column with weights of its own; restore_window must not (found in review:
    1.5e-5 apart on OpenCV 5.0, a mask pixel apart at a threshold that close)."""
    from model.inference import Segmenter, restore_window

    g = Preprocessor(512).geometry(h, w)
    plane = np.random.default_rng(h + w).random((512, 512)).astype(np.float32)
    whole = g.restore(plane)
    for left in (0, 1, w // 2, w - 1):
        window = restore_window(plane, g, (0, h, left, left + 1))
        np.testing.assert_allclose(window, whole[:, left : left + 1], rtol=0, atol=RESTORE_ATOL)
    if w == 100:  # the review's case: the horizontal scale is 1 and a group sits in column 0 alone
        plane = np.zeros((512, 512), np.float32)
        plane[g.top : g.top + g.scaled_h, g.left] = np.random.default_rng(0).random(512).astype(np.float32)
        whole = g.restore(plane)[:, 0]
        r = int(np.argmax(np.abs(whole - whole.mean())))
        seg = Segmenter.__new__(Segmenter)
        seg.postprocessor = Postprocessor(threshold=float(whole[r]) + 5e-6, min_region_fraction=0.0)
        exact, fast = seg.finish(plane, g), seg.finish_windowed(plane, g)
        assert fast.windows == [(0, h, 0, 1)] and np.array_equal(fast.mask, exact.mask)


@pytest.mark.parametrize("seed", range(8))
def test_windowed_finish_makes_the_full_probabilities_only_when_read(seed):
    """The worker's statistics come from the windows' own probabilities (no full-size map made), equal to
    the statistics over the full map; reading ``prob`` makes that map once, 0 outside the windows."""
    from model.inference import Prediction, Segmenter
    from model.stats import tumor_statistics

    rng = np.random.default_rng(300 + seed)
    size = 64
    h, w = int(rng.integers(2 * size, 2000)), int(rng.integers(2 * size, 2000))
    g = Preprocessor(size).geometry(h, w)
    plane = scattered_lesions(rng, size, g)
    seg = Segmenter.__new__(Segmenter)
    seg.postprocessor = Postprocessor(threshold=0.5, min_region_fraction=float(rng.choice([0.0, 2e-4])))
    fast, exact = seg.finish_windowed(plane, g), seg.finish(plane, g)
    windowed = sum(b[3] - b[2] for b in fast.windows) < w
    assert fast.windows and len(fast.window_probs) == len(fast.windows)
    assert (fast._prob is None) == windowed, "no full-size map unless the whole image was restored"
    spacing = (0.1, 0.2)
    stats = fast.statistics(spacing)
    assert (fast._prob is None) == windowed, "the statistics read the windows only"
    want = tumor_statistics(exact.mask, exact.prob, spacing).as_dict()
    got = stats.as_dict()
    assert got.pop("prob_mean") == pytest.approx(want.pop("prob_mean"), rel=1e-6, abs=0)
    assert got.pop("prob_max") == pytest.approx(want.pop("prob_max"), abs=RESTORE_ATOL)
    assert got == want and stats.tumor_detected
    prob = fast.prob
    assert prob is fast.prob and prob.shape == (h, w) and prob.dtype == np.float32
    for (t, b, l, r), window in zip(fast.windows, fast.window_probs):
        assert np.array_equal(prob[t:b, l:r], window)
    covered = np.zeros((h, w), bool)
    for t, b, l, r in fast.windows:
        covered[t:b, l:r] = True
    assert windowed is False or not prob[~covered].any()
    np.testing.assert_allclose(prob[covered], exact.prob[covered], rtol=0, atol=RESTORE_ATOL)
    with pytest.raises(ValueError, match="windows"):
        Prediction(prob=None, mask=fast.mask)
    with pytest.raises(ValueError, match="window_probs"):
        tumor_statistics(fast.mask, None, windows=fast.windows, window_probs=fast.window_probs[:-1])
    with pytest.raises(ValueError, match="window_probs"):
        tumor_statistics(fast.mask, fast.prob, windows=fast.windows, window_probs=fast.window_probs)


@pytest.mark.parametrize("seed", range(8))
def test_windowed_statistics_take_the_regions_the_clean_up_counted(seed, monkeypatch):
    """The clean-up tells each window's regions (traced borders, a ring's filled hole taking in the blob
    inside it); the statistics use them instead of counting again: the same numbers as counting."""
    from model import postprocess
    from model.inference import Segmenter
    from model.stats import tumor_statistics

    monkeypatch.setattr(postprocess, "BORDER_MAX_CHANGES", float("inf"))  # the borders' way for every window
    rng = np.random.default_rng(700 + seed)
    size = 64
    h, w = int(rng.integers(2 * size, 2000)), int(rng.integers(2 * size, 2000))
    g = Preprocessor(size).geometry(h, w)
    seg = Segmenter.__new__(Segmenter)
    seg.postprocessor = Postprocessor(threshold=0.5, min_region_fraction=2e-4)
    fast = seg.finish_windowed(scattered_lesions(rng, size, g), g)
    assert fast.zero_one and len(fast.window_regions) == len(fast.windows)
    assert None not in fast.window_regions and sum(fast.window_regions) > 0
    counted = tumor_statistics(fast.mask, None, (0.1, 0.2), windows=fast.windows, window_probs=fast.window_probs,
                               hole_free=True)
    assert fast.statistics((0.1, 0.2)) == counted
    whole = tumor_statistics(fast.mask, fast.prob, (0.1, 0.2)).as_dict()  # labelled over the whole mask
    assert whole.pop("prob_mean") == pytest.approx(counted.prob_mean, rel=1e-12)
    assert whole == {k: v for k, v in counted.as_dict().items() if k != "prob_mean"}
    wrong = [n + 1 for n in fast.window_regions]  # what it is told is what it reports: the counts are taken as given
    told = tumor_statistics(fast.mask, None, windows=fast.windows, window_probs=fast.window_probs, window_regions=wrong)
    assert told.n_regions == counted.n_regions + sum(1 for n in fast.window_regions if n)  # empty windows add none
    with pytest.raises(ValueError, match="window_regions"):
        tumor_statistics(fast.mask, None, windows=fast.windows, window_probs=fast.window_probs, window_regions=wrong[:-1])


def test_overlapping_windows_merge_until_none_overlap():
    """A and B overlap; the box around them overlaps C, which overlaps neither: one more round."""
    from model.inference import _merge_overlapping

    a, b, c, d = (0, 10, 0, 10), (5, 15, 5, 15), (12, 20, 0, 4), (30, 40, 30, 40)
    merged = _merge_overlapping(np.array([a, b, c, d], np.int64))
    assert sorted(map(tuple, merged.tolist())) == [(0, 20, 0, 15), (30, 40, 30, 40)]
    assert _merge_overlapping(np.array([a, d], np.int64)).tolist() == [list(a), list(d)]  # touching nothing: as they are
    touching = np.array([(0, 10, 0, 10), (10, 20, 0, 10)], np.int64)  # they share an edge, not a pixel
    assert _merge_overlapping(touching).tolist() == touching.tolist()


def test_statistics_by_window_without_probabilities():
    from model.stats import tumor_statistics

    mask = np.zeros((300, 200), np.uint8)
    mask[10:20, 10:30] = 1
    mask[200:260, 150:170] = 1
    mask[205:215, 155:160] = 0  # a hole
    windows = [(0, 40, 0, 50), (190, 280, 140, 200), (100, 120, 0, 200)]  # the last holds nothing
    got = tumor_statistics(mask, None, (0.1, 0.2), windows=windows)
    assert got == tumor_statistics(mask, None, (0.1, 0.2)) and got.n_regions == 2 and got.prob_mean is None
    assert tumor_statistics(mask, None, windows=[]).tumor_detected is False  # nothing in the windows: nothing found


def test_windows_are_one_per_place_and_one_around_many(monkeypatch):
    import model.inference as inference
    from model.inference import window_bounds, windows

    g = Preprocessor(64).geometry(1200, 1000)
    plane = np.zeros((64, 64), np.float32)
    assert windows(plane, g, 0.5) == [] and window_bounds(plane, g, 0.5) is None
    plane[10, 10] = plane[50, 40] = 0.9
    found = windows(plane, g, 0.5)
    assert len(found) == 2 and all(b - t <= 2 * 19 and r - l <= 2 * 19 for t, b, l, r in found)  # a frame pixel's taps
    plane[10, 14] = 0.9  # 4 frame pixels from [10, 10]: their taps never meet, its own window
    assert len(windows(plane, g, 0.5)) == 3
    plane[10, 12] = 0.9  # 2 from each: one group
    assert len(windows(plane, g, 0.5)) == 2
    monkeypatch.setattr(inference, "MAX_WINDOWS", 1)
    assert windows(plane, g, 0.5) == [window_bounds(plane, g, 0.5)]


def test_windowed_finish_hands_large_windows_to_opencv(monkeypatch):
    import model.inference as inference
    from model.inference import Segmenter

    seg = Segmenter.__new__(Segmenter)
    seg.postprocessor = Postprocessor(0.5)
    g = Preprocessor(64).geometry(600, 500)
    plane = np.full((64, 64), 0.9, np.float32)  # the whole image is "tumor"
    monkeypatch.setattr(inference, "restore_window", lambda *a: pytest.fail("a window this large goes to cv2.resize"))
    a, b = seg.finish(plane, g), seg.finish_windowed(plane, g)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.prob, b.prob)


def test_windowed_finish_falls_back_when_the_image_is_smaller_than_the_frame():
    from model.inference import Segmenter

    seg = Segmenter.__new__(Segmenter)
    seg.postprocessor = Postprocessor(0.5)
    g = Preprocessor(64).geometry(40, 30)
    plane = blobs(np.random.default_rng(3), 64, 64, 2)
    a, b = seg.finish(plane, g), seg.finish_windowed(plane, g)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.prob, b.prob)
