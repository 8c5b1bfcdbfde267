"""Batched inference: gray radiographs of any size -> probability maps and masks
at the original size.

The same ``Preprocessor`` and ``Postprocessor`` as training's evaluation, so
what was measured is what runs. The network runs with channels_last weights
on every device (on this project's 2-core CPU that alone makes the thesis
network 2.2x and the demo network 2.7x faster, docs/benchmarks.md); on CUDA
under bf16 autocast as well (about 4x the fp32 batch-1 throughput on an
H100, see DESIGN.md), on CPU in fp32 unless asked for bf16 (``cpu_bf16``). Thread counts are the caller's business
(``torch.set_num_threads``).

``predict`` is three steps that the worker's pipeline (worker/pipeline.py)
also calls one by one, so that preprocessing and postprocessing run in its
thread pool while the network works on the next batch:

    prepare(image) -> (frame, geometry)      any thread; numpy and OpenCV
    forward(frames) -> (n, S, S) planes       the network; one caller at a time
                                              (submit(frames).result() one batch at a time: on CUDA
                                              the next batch can be launched before reading it)
    finish(plane, geometry) -> Prediction     any thread; numpy and OpenCV
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import cv2
import numpy as np
import torch

from model.checkpoint import LoadedModel
from model.network import fold_batchnorm
from model.postprocess import Postprocessor, clean_regions, clean_regions_counted
from model.preprocess import Geometry
from model.stats import TumorStats, tumor_statistics


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this x86 CPU computes bf16 natively (AVX512-BF16 or AMX); None where /proc/cpuinfo is unreadable
    or is not an x86 one.

    Without it, CPU autocast emulates bf16 and runs several times slower than fp32 (an AVX2-only EPYC: no
    training epoch of the 256-px half-width network in 14 minutes, against 7–9 minutes in fp32).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.partition(":")[2].split()}
    if not flags:  # not an x86 cpuinfo (ARM lists "Features"): no verdict
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def bf16_autocast(device: torch.device, cpu_bf16: bool = False):
    """The network's precision, for serving and training alike: bf16 autocast on CUDA always; on a CPU only when
    asked (INFER_CPU_BF16, ``--cpu-bf16``); fp32 otherwise."""
    if device.type == "cuda" or (cpu_bf16 and device.type == "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wants_cpu_bf16(mode: str) -> bool:
    """INFER_CPU_BF16's value: "on", "off", or "auto" (on where the CPU computes bf16 natively)."""
    return mode == "on" or (mode == "auto" and bool(cpu_has_native_bf16()))


class Prediction:
    """What the network found on one image, at its original size.

    ``mask``: (orig_h, orig_w) uint8 {0, 1} after postprocessing. ``prob``:
    (orig_h, orig_w) float32 probabilities. ``windows``: disjoint (top,
    bottom, left, right) boxes holding every mask pixel, no region in two
    (``model.inference.windows``), when the probabilities were restored in
    windows (``Segmenter.finish_windowed``); then ``window_probs`` holds the
    probabilities inside each window. When the windows were restored one by
    one, ``prob`` (0 outside them) is made from them only when it is first
    read (when they span the image's width it is the whole restore): a 3000x2500 map is 30 MB to
    clear, ~3 ms of a core per image that the worker, which reads only the
    windows (``tumor_statistics(..., window_probs=...)``), no longer pays.
    ``window_regions``: each window's 8-connected regions where the clean-up
    counted them (None where it did not), so that the statistics need not
    count them again; ``zero_one``: the mask holds only 0s and 1s.
    """

    __slots__ = ("mask", "windows", "window_probs", "window_regions", "hole_free", "zero_one", "_prob")

    def __init__(self, prob: np.ndarray | None, mask: np.ndarray, windows: list[tuple[int, int, int, int]] | None = None,
                 window_probs: list[np.ndarray] | None = None, hole_free: bool = False,
                 window_regions: list[int | None] | None = None, zero_one: bool = False):
        if prob is None and (windows is None or window_probs is None or len(windows) != len(window_probs)):
            raise ValueError("a Prediction without prob needs its windows and one probability array per window")
        self.mask, self.windows, self.window_probs, self._prob = mask, windows, window_probs, prob
        self.hole_free = hole_free  # the postprocessing filled the mask's holes (``tumor_statistics``)
        self.window_regions = window_regions  # each window's regions, where the clean-up counted them
        self.zero_one = zero_one  # the mask holds only 0s and 1s

    @property
    def prob(self) -> np.ndarray:
        if self._prob is None:
            prob = np.zeros(self.mask.shape, np.float32)
            for (top, bottom, left, right), window in zip(self.windows, self.window_probs):
                prob[top:bottom, left:right] = window
            self._prob = prob
        return self._prob

    def statistics(self, pixel_spacing_mm: tuple[float, float] | None = None) -> TumorStats:
        """``tumor_statistics`` of the mask, reading only the windows where there are any."""
        known = dict(hole_free=self.hole_free, window_regions=self.window_regions, zero_one=self.zero_one)
        if self._prob is None:
            return tumor_statistics(self.mask, None, pixel_spacing_mm, windows=self.windows, window_probs=self.window_probs,
                                    **known)
        return tumor_statistics(self.mask, self._prob, pixel_spacing_mm, windows=self.windows, **known)

    def __repr__(self) -> str:
        return f"Prediction(shape={self.mask.shape}, windows={self.windows})"


class Planes:
    """The probabilities of one ``Segmenter.submit`` batch, ready or on their way from the GPU."""

    def __init__(self, planes: np.ndarray, done=None):
        self._planes = planes  # (n, S, S) float32; on CUDA pinned memory the GPU copies into until ``done``
        self._done = done  # a torch.cuda.Event recorded after that copy; None: ready

    @property
    def ready(self) -> bool:
        """Whether ``result()`` returns without waiting."""
        return self._done is None or self._done.query()

    def result(self) -> np.ndarray:
        """(n, S, S) float32 probabilities, waiting for the GPU if it is not done."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        return self._planes


def postprocess_cropped(postprocessor: Postprocessor, prob: np.ndarray) -> np.ndarray:
    """``postprocessor(prob)``, bit for bit, doing the region clean-up and hole
    filling only inside the bounding box of the thresholded pixels.

    On a 3000x2500 radiograph the full-image connected components and flood
    fill cost about 60 ms of the 70 ms that ``Postprocessor`` takes; a tumor
    covers a small part of the image. Exact because every thresholded pixel
    (so every region) lies in the box, the minimum region area is still taken
    from the whole image, and every background pixel on the box's edge touches
    the background outside the box (or the image border), which reaches the
    border: so a hole inside the box is a hole in the image and the reverse.
    A subclass of ``Postprocessor`` (which may do other things) is called as it is.
    """
    if type(postprocessor) is not Postprocessor:
        return postprocessor(prob)
    prob = np.asarray(prob)
    if prob.ndim != 2 or prob.size == 0:
        return postprocessor(prob)  # its own error message
    return _clean_in_box(postprocessor, prob > postprocessor.threshold, prob.size)


def _min_area(postprocessor: Postprocessor, image_pixels: int) -> int:
    """The smallest region ``postprocessor`` keeps on an image of ``image_pixels`` (as ``Postprocessor.__call__``)."""
    return max(1, math.ceil(postprocessor.min_region_fraction * image_pixels))


def _clean_in_box(postprocessor: Postprocessor, above: np.ndarray, image_pixels: int) -> np.ndarray:
    """Steps 2 and 3 of ``postprocessor`` on the thresholded pixels ``above``,
    inside their bounding box (postprocess_cropped says why that is exact);
    small regions are measured against ``image_pixels``."""
    above = np.ascontiguousarray(above, dtype=bool).view(np.uint8)  # no copy for the callers' boolean maps
    x0, y0, w, h = cv2.boundingRect(above)
    if w == 0:
        return np.zeros(above.shape, np.uint8)
    min_area = _min_area(postprocessor, image_pixels)
    crop = clean_regions(above[y0 : y0 + h, x0 : x0 + w], min_area, postprocessor.fill_holes)
    if crop.shape == above.shape:
        return crop
    out = np.zeros(above.shape, np.uint8)
    out[y0 : y0 + h, x0 : x0 + w] = crop
    return out


# A probability this far below the threshold in the frame cannot reach it after
# interpolation (float rounding of a convex combination is far smaller).
_MARGIN = 1e-5


def _linear_taps(dst: int, src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every destination index of a ``src -> dst`` resize, OpenCV's
    INTER_LINEAR source pair (i0, i1) and weight of i1, computed as
    ``cv2.resize`` does: half-pixel centres, float32 weights, clamped edges."""
    scale = 1.0 / (dst / src)  # cv2: scale_x = 1. / inv_scale_x, in double
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    w = f - i0.astype(np.float32)
    low, high = i0 < 0, i0 >= src - 1
    i0[low], w[low] = 0, 0.0
    i0[high], w[high] = src - 1, 0.0
    return i0, np.minimum(i0 + 1, src - 1), w.astype(np.float32)


def window_bounds(plane: np.ndarray, geometry: Geometry, threshold: float) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the smallest rectangle of the original
    image outside which every value of ``geometry.restore(plane)`` is at most
    ``threshold`` (bilinear interpolation never exceeds its inputs), or None
    when no frame pixel comes near the threshold. Only for enlarging restores
    (the image at least as large as its place in the frame, both ways: any
    radiograph); ValueError otherwise (OpenCV shrinks by exactly 2 with
    INTER_AREA, which ``restore_window`` does not copy)."""
    g = geometry
    if g.orig_h < g.scaled_h or g.orig_w < g.scaled_w:
        raise ValueError("restore_window only enlarges; use Geometry.restore")
    crop = np.asarray(plane)[g.top : g.top + g.scaled_h, g.left : g.left + g.scaled_w]
    near = crop > threshold - _MARGIN
    rows = np.flatnonzero(near.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(near.any(axis=0))
    (ry0, ry1, _), (cx0, cx1, _) = _linear_taps(g.orig_h, g.scaled_h), _linear_taps(g.orig_w, g.scaled_w)
    # destination rows/columns whose taps touch the frame pixels that come near the threshold
    ys = np.flatnonzero((ry1 >= rows[0]) & (ry0 <= rows[-1]))
    xs = np.flatnonzero((cx1 >= cols[0]) & (cx0 <= cols[-1]))
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


# A bound on the Python work per image (each window costs tens of microseconds); beyond it, one window.
MAX_WINDOWS = 256


def windows(plane: np.ndarray, geometry: Geometry, threshold: float, min_area: int = 1) -> list[tuple[int, int, int, int]]:
    """Disjoint (top, bottom, left, right) windows of the original image such
    that every value of ``geometry.restore(plane)`` above ``threshold`` lies
    in one, and every 8-connected region of the thresholded map (with its
    holes) lies in one: ``window_bounds`` cut into the separate places where
    something was found. [] when nothing comes near the threshold (or every
    group is smaller than ``min_area``); the one window of ``window_bounds``
    when there are more than ``MAX_WINDOWS`` groups (those not inside
    another's hole, counted before ``min_area`` leaves any out).

    Why a region cannot span two windows: a restored pixel above the
    threshold has a frame pixel among its four interpolation taps that comes
    near it, and the taps of two 8-adjacent restored pixels are at most 2
    frame pixels apart (an enlarging resize moves its taps by at most one per
    pixel). So the frame's near pixels are grouped with their neighbours up
    to 2 apart (a 3x3 dilation, then its 8-connected groups, which join
    some 3 apart too: harmless), each group
    becomes the window its taps reach, and windows that overlap are merged
    until none does. The groups are found by their outer borders
    (``cv2.findContours``): a group inside another's hole lies in that
    one's box, so in its window, and is left to it. A region's holes lie
    in its bounding box, so in its window; and no region encloses a pixel
    of another window, whose rectangle would then overlap its own. Same
    conditions as ``window_bounds``.

    ``min_area``: a group whose window holds fewer pixels is left out before
    merging (its regions are smaller than that, so the postprocessing
    removes them; where one lies in another region's hole, that region's
    window holds it). A random network's specks go without being restored
    (unless there are more than ``MAX_WINDOWS`` groups).
    """
    g = geometry
    if g.orig_h < g.scaled_h or g.orig_w < g.scaled_w:
        raise ValueError("restore_window only enlarges; use Geometry.restore")
    crop = np.asarray(plane)[g.top : g.top + g.scaled_h, g.left : g.left + g.scaled_w]
    near = (crop > threshold - _MARGIN).view(np.uint8)
    if not near.any():
        return []
    grouped = cv2.dilate(near, np.ones((3, 3), np.uint8))
    # each group's box from its outer border (OpenCV's labelling with statistics cost ~10x as much at 512)
    borders, _ = cv2.findContours(grouped, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if len(borders) > MAX_WINDOWS:
        return [window_bounds(plane, g, threshold)]
    (ry0, ry1, _), (cx0, cx1, _) = _linear_taps(g.orig_h, g.scaled_h), _linear_taps(g.orig_w, g.scaled_w)
    rows, cols = near.shape
    x, y, w, h = np.array([cv2.boundingRect(border) for border in borders], np.int64).reshape(-1, 4).T
    # the groups' near pixels: their dilated boxes less the dilation's 1 pixel (unless clipped at the edge)
    y0, y1 = np.where(y > 0, y + 1, 0), np.where(y + h < rows, y + h - 2, rows - 1)
    x0, x1 = np.where(x > 0, x + 1, 0), np.where(x + w < cols, x + w - 2, cols - 1)
    # the destination rows and columns whose taps touch them
    boxes = np.stack([np.searchsorted(ry1, y0), np.searchsorted(ry0, y1, side="right"),
                      np.searchsorted(cx1, x0), np.searchsorted(cx0, x1, side="right")], axis=1)
    boxes = boxes[(boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) >= min_area]
    return [tuple(int(v) for v in b) for b in _merge_overlapping(boxes)]


def _merge_overlapping(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) half-open (top, bottom, left, right) boxes -> boxes that do not
    overlap: each group of overlapping ones replaced by the box around it,
    until no two overlap."""
    while len(boxes) > 1:
        t, b, l, r = boxes.T
        overlap = (t[:, None] < b) & (t < b[:, None]) & (l[:, None] < r) & (l < r[:, None])
        np.fill_diagonal(overlap, False)
        if not overlap.any():
            break
        root = np.arange(len(boxes))
        for i, j in np.argwhere(np.triu(overlap)):  # union-find over the overlapping pairs
            while root[i] != i:
                i = root[i]
            while root[j] != j:
                j = root[j]
            root[max(i, j)] = min(i, j)
        for i in range(len(root)):
            root[i] = root[root[i]]  # roots come before their members, so one pass flattens
        groups, index = np.unique(root, return_inverse=True)
        merged = np.empty((len(groups), 4), np.int64)
        merged[:, [0, 2]] = np.iinfo(np.int64).max
        merged[:, [1, 3]] = np.iinfo(np.int64).min
        np.minimum.at(merged[:, 0], index, t)
        np.maximum.at(merged[:, 1], index, b)
        np.minimum.at(merged[:, 2], index, l)
        np.maximum.at(merged[:, 3], index, r)
        boxes = merged
    return boxes


def restore_across(plane: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The first pass of ``geometry.restore(plane)``: every row of the image's
    part of the frame resized to the original width, (scaled_h, orig_w)
    float32, by ``cv2.resize`` itself (rows kept as they are, which OpenCV
    computes exactly: weights 1 and 0). A few hundred thousand pixels."""
    g = geometry
    crop = np.asarray(plane)[g.top : g.top + g.scaled_h, g.left : g.left + g.scaled_w].astype(np.float32)
    return cv2.resize(crop, (g.orig_w, g.scaled_h), interpolation=cv2.INTER_LINEAR)


def restore_window(plane: np.ndarray, geometry: Geometry, bounds: tuple[int, int, int, int],
                   across: np.ndarray | None = None) -> np.ndarray:
    """``geometry.restore(plane)[top:bottom, left:right]`` from OpenCV's two
    passes: the rows resized to the original width
    (``restore_across``, or ``across`` when the caller has it), cut to the
    window's columns, then those columns resized to the original height and
    cut to the window's rows. OpenCV's INTER_LINEAR resizes rows first and
    then columns, with the taps and weights of the whole image in each pass,
    so the window's values are the whole restore's: bit for bit with OpenCV
    4.12, 4.13 and 5.0 (4.10 differs by up to 3e-8; tests allow 1e-6). The second pass
    costs the window's width times the image's height."""
    g = geometry
    top, bottom, left, right = bounds
    if across is None:
        across = restore_across(plane, g)
    # OpenCV resizes a single column with other weights than its general path (1.5e-5 apart, OpenCV 5.0): take two
    lo, hi = left, right
    if right - left == 1 and g.orig_w > 1:
        lo, hi = (left, left + 2) if left + 2 <= g.orig_w else (left - 1, right)
    columns = np.ascontiguousarray(across[:, lo:hi])
    return cv2.resize(columns, (hi - lo, g.orig_h), interpolation=cv2.INTER_LINEAR)[top:bottom, left - lo : right - lo]


GPU_BATCH = 16
CPU_BATCH_ELEMENTS = 2**21


# Test-time augmentation (INFER_TTA): the mean of the network's probabilities over mirrored copies of each frame,
# mirrored back. Mode -> the flips (tensor dims) of its passes; () is the frame as it is.
TTA_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "off": ((),),
    "flip": ((), (-1,)),  # left-right: twice the network's work
    "flip4": ((), (-1,), (-2,), (-2, -1)),  # left-right, up-down and both: four times (training flips both axes)
}
TTA_MODES = tuple(TTA_FLIPS)


def serving_tta(setting: str, loaded: LoadedModel) -> str:
    """The TTA mode a worker serves ``loaded`` with: INFER_TTA's value, or for "auto" the checkpoint's own
    (``LoadedModel.recommended_tta``: the mode its threshold was chosen and validated for)."""
    return tta_mode(loaded.recommended_tta if setting == "auto" else setting)


def tta_mode(value) -> str:
    """A TTA mode from a mode name or a bool (True: "flip", the first mode; False/None: "off")."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "flip"
    if value not in TTA_FLIPS:
        raise ValueError(f"TTA mode must be one of {TTA_MODES}, got {value!r}")
    return value


def default_batch_size(config, size: int, cuda: bool, flip_tta=False) -> int:
    """The forward batch when none is configured (INFER_BATCH_SIZE=auto).

    A GPU wants large batches, up to a point: 16 (the fastest of 8-128 for
    the thesis network at 512 on an H100, 2026-11-27: 596-628 images/s
    against 415 at 32 and 434 at 64, docs/benchmarks.md). A CPU is the other way round: past a few images the first
    level's activations (first filters x size x size floats per image) no
    longer fit the caches and every image gets slower. Measured on the
    2-core AMD EPYC (docs/benchmarks.md, ``python -m bench --sweep-batches``,
    2 torch threads, img/s at batch 1/2/4/8/16): the thesis network at 512 px
    0.96/0.92/0.77/0.60/0.54, the shipped BTXRD-256 network
    12.6/12.5/13.3/13.1/10.1, the synthetic demo network 55/62/79/57/63. The
    largest power of two with at most 2**21 first-level activations per
    forward pass (1, 2 and 4 for those three; up to 16 for smaller ones) is
    within 6% of the best of each, and 1.2-1.8x faster than 16.
    """
    passes = len(TTA_FLIPS[tta_mode(flip_tta)])
    if cuda:  # the images whose passes make up one GPU batch of 16
        return max(1, GPU_BATCH // passes)
    per_image = config.filters[0] * size * size * passes
    batch = 1
    while batch * 2 * per_image <= CPU_BATCH_ELEMENTS and batch * 2 <= GPU_BATCH:
        batch *= 2
    return batch


class Segmenter:
    """Runs a loaded checkpoint over lists of images in batches.

    Args:
        loaded: from ``load_checkpoint``; its network is moved to ``device``
            (once, here) and served, or a copy of it with its BatchNorms
            folded, the network itself left as it is (``fold_bn``).
        device: "cuda", "cpu", ...; None picks "cuda" when available.
        batch_size: images per forward pass; None picks ``default_batch_size``
            for the device (16 on CUDA; on a CPU 1-16 by the network's size).
        compile_network: wrap the network in ``torch.compile`` with static
            shapes (TORCH_COMPILE; on an H100 it took the thesis network
            at batch 16 from 596 to 828 images/s, docs/benchmarks.md).
            Partial batches are padded to ``batch_size`` so the network is
            compiled once; ``warmup`` pays for the compilation.
        channels_last: run the network in channels_last memory format (NHWC),
            which oneDNN on CPU and cuDNN's tensor-core kernels on CUDA are
            fastest with; False keeps PyTorch's default (NCHW).
        flip_tta: test-time augmentation (INFER_TTA), a mode of ``TTA_FLIPS``
            or a bool (True: "flip"): average each probability map with those
            of the mirrored frames: "flip" left-right (twice the network's
            work), "flip4" left-right, up-down and both (four times);
            ``version`` then ends in "+flip-tta" / "+flip4-tta", so the rows
            record what made them. The mask then comes from the checkpoint's
            postprocessing for that mode (its own threshold, chosen on
            validation) when it has one.
        cudnn_benchmark: on CUDA, set ``torch.backends.cudnn.benchmark``
            (CUDNN_BENCHMARK; process-wide): cuDNN times its algorithms for
            each new input shape and keeps the fastest, instead of choosing
            by heuristics. The frames have one size; compiled, every batch
            is padded to one shape, timed in the warm-up; uncompiled, each
            new batch size (a partial last batch) is timed once, when first
            seen. PyTorch's performance guide recommends it for fixed input
            sizes; training sets it too. Workers may then run different
            algorithms, whose results can differ in the last bits. Not yet
            measured on a GPU for serving.
        cpu_bf16: on a CPU, run the network under bf16 autocast (INFER_CPU_BF16):
            on a CPU with AMX 2.2x (the shipped network) to 3.7x (the thesis
            network) the fp32 rate, docs/benchmarks.md; ``version`` then ends
            in "+cpu-bf16". Ignored on CUDA, which always runs bf16.
        fold_bn: serve ``model.network.fold_batchnorm``'s copy of the network,
            every BatchNorm folded into the convolution before it, one pass
            over the activations less per BatchNorm (the thesis network at 512
            on a 2-core CPU ~5% faster); False runs the network as trained,
            layer by layer. None (the default): folded where the network runs
            in float32 (a CPU without ``cpu_bf16``), where it is the same
            function to float rounding (one mask pixel in millions moved);
            not under bf16 (CUDA, ``cpu_bf16``), where the folded weights
            round differently: on the 1,668 BTXRD radiographs in bf16 the
            served masks' pooled Dice with the annotations was 0.6335 folded
            against 0.6346 as trained (0.6344 in float32), and the speed on a
            GPU is unmeasured (docs/benchmarks.md 2026-12-07 12:00).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: str | None = None,
        batch_size: int | None = None,
        compile_network: bool = False,
        channels_last: bool = True,
        flip_tta: bool | str = False,
        cpu_bf16: bool = False,
        cudnn_benchmark: bool = True,
        fold_bn: bool | None = None,
    ):
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None (automatic), got {batch_size!r}")
        config = loaded.network.config
        if config.in_channels != 1 or config.out_channels != 1:
            raise ValueError(f"Segmenter needs a 1-in, 1-out network, got {config.in_channels} in, {config.out_channels} out")
        if loaded.preprocessor.size % config.multiple:
            raise ValueError(f"preprocessing size {loaded.preprocessor.size} is not divisible by {config.multiple}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
        self.channels_last = bool(channels_last)
        self.cpu_bf16 = bool(cpu_bf16) and self.device.type == "cpu"
        self.fold_bn = (not self.cuda and not self.cpu_bf16) if fold_bn is None else bool(fold_bn)
        # BatchNorm folded into the convolutions: an inference copy; loaded.network is left as it is unless not folding
        network = (fold_batchnorm(loaded.network) if self.fold_bn else loaded.network).to(self.device).eval()
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        self.compiled = bool(compile_network)
        self.network = torch.compile(network, dynamic=False) if self.compiled else network
        self.preprocessor = loaded.preprocessor
        self._postprocessor, self._postprocessors_tta = loaded.postprocessor, dict(loaded.postprocessors_tta)
        self.tta = tta_mode(flip_tta)
        self.batch_size = batch_size or default_batch_size(config, loaded.preprocessor.size, self.cuda, self.tta)
        self.version = (loaded.version + (f"+{self.tta}-tta" if self.tta != "off" else "")
                        + ("+cpu-bf16" if self.cpu_bf16 else ""))
        self.label = loaded.label

    def predict_batch_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) preprocessed frames -> (N, 1, S, S) float32 probabilities, on ``self.device``."""
        with torch.inference_mode():
            x = x.to(self.device, dtype=torch.float32, non_blocking=True)
            # One stride pattern whatever made the batch (a numpy view whose channel axis has stride 0, a
            # padded copy, frames stacked on the GPU): a compiled network guards on strides, and a padded
            # last batch compiled it a second time (seconds on an H100, inside the first chunk's time).
            x = x.clone(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            n = x.shape[0]
            flips = TTA_FLIPS[self.tta]
            if len(flips) > 1:  # one pass over all copies: the batch the GPU sees doubles (flip4: quadruples)
                x = torch.cat([x.flip(dims) if dims else x for dims in flips])
            with bf16_autocast(self.device, self.cpu_bf16):
                logits = self.network(x)
            prob = torch.sigmoid(logits.float())
            if len(flips) == 1:
                return prob
            parts = [prob[i * n : (i + 1) * n] for i in range(len(flips))]
            return sum(p.flip(dims) if dims else p for p, dims in zip(parts, flips)) / len(flips)

    @property
    def flip_tta(self) -> bool:
        """Whether any TTA is on (``tta``, the mode, says which)."""
        return self.tta != "off"

    @flip_tta.setter
    def flip_tta(self, value) -> None:
        self.tta = tta_mode(value)

    @property
    def postprocessor(self) -> Postprocessor:
        """The postprocessing in use: the checkpoint's one for the TTA mode in use when it has one."""
        if self._postprocessors_tta and self.tta in self._postprocessors_tta:
            return self._postprocessors_tta[self.tta]
        return self._postprocessor

    @postprocessor.setter
    def postprocessor(self, post: Postprocessor) -> None:
        """Use ``post`` with and without TTA."""
        self._postprocessor, self._postprocessors_tta = post, {}

    # -- the three steps of predict -------------------------------------------

    def prepare(self, image, shape: tuple[int, int] | None = None) -> tuple:
        """Gray (H, W) image -> ((S, S) float32 frame, Geometry); thread-safe.
        A numpy image gives a numpy frame; an (H, W) uint8 torch tensor (pixels
        decoded on the GPU) a frame tensor on its device (``prepare_tensor``).
        ``shape``: the full (H, W) when a numpy image is a reduced decode of it
        (``Preprocessor.__call__``)."""
        if isinstance(image, torch.Tensor):
            if shape is not None and tuple(shape) != tuple(image.shape):
                raise ValueError("a tensor image is prepared at its own size")
            return self.preprocessor.prepare_tensor(image)
        return self.preprocessor(image, shape)

    def submit(self, frames: list) -> "Planes":
        """Start the network on up to ``batch_size`` frames (numpy, or tensors
        from ``prepare``); ``Planes.result()`` gives their (n, S, S) float32
        probabilities on the CPU, in order.

        On a CPU the work is done here and the result is ready. On CUDA it
        is queued and this returns at once: the frames go into pinned host
        memory in one copy, and the copies to the GPU and back are
        asynchronous, so the caller can prepare and launch the next batch
        while the GPU works on this one. Before, each batch was stacked,
        copied to pinned memory, run, copied back into pageable memory and
        copied again on the calling thread while the GPU waited (about as
        long as a compiled batch's own time, by the copies' sizes: an
        estimate, not measured). Pinned blocks are PyTorch's caching host
        allocator's, which reuses one only after the copies that used it
        are done. One caller at a time."""
        n = len(frames)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"submit takes 1 to {self.batch_size} frames, got {n}")
        size = self.preprocessor.size
        pad = self.batch_size - n if self.compiled else 0  # one shape, one compilation
        if any(isinstance(f, torch.Tensor) for f in frames):  # frames prepared on the device
            if self.cuda:
                current = torch.cuda.current_stream(self.device)
                for f in frames:  # made on a pool thread's stream: keep their memory until this stream is done
                    if isinstance(f, torch.Tensor) and f.is_cuda:
                        f.record_stream(current)
            x = torch.stack([torch.as_tensor(f, device=self.device) for f in frames])[:, None]
            if pad:
                x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        else:
            x = torch.empty((n + pad, 1, size, size), dtype=torch.float32, pin_memory=self.cuda)
            np.stack(frames, out=x.numpy()[:n, 0])  # (n, S, S) straight into the batch: one copy
            if pad:
                x[n:] = 0
        prob = self.predict_batch_tensor(x)[:n, 0]  # (n, S, S)
        if not self.cuda:
            return Planes(prob.numpy())
        host = torch.empty((n, size, size), dtype=torch.float32, pin_memory=True)
        host.copy_(prob, non_blocking=True)
        done = torch.cuda.Event(blocking=True)  # result() sleeps instead of spinning a core finishing needs
        done.record(torch.cuda.current_stream(self.device))
        return Planes(host.numpy(), done)

    def stream(self, batches: Iterable[list]) -> Iterator[np.ndarray]:
        """Each batch's (n, S, S) probabilities (``submit``), in order, the
        next batch launched before the last one's result is read."""
        launched = None
        for batch in batches:
            planes = self.submit(batch)
            if launched is not None:
                yield launched.result()
            launched = planes
        if launched is not None:
            yield launched.result()

    def forward(self, frames: list) -> np.ndarray:
        """Up to any number of (S, S) frames (numpy, or tensors from ``prepare``)
        -> (n, S, S) float32 probabilities on the CPU, in forward passes of at
        most ``batch_size`` (``stream``)."""
        size, step = self.preprocessor.size, self.batch_size
        out = np.empty((len(frames), size, size), np.float32)
        starts = range(0, len(frames), step)
        for start, planes in zip(starts, self.stream(frames[start : start + step] for start in starts)):
            out[start : start + step] = planes
        return out

    def finish(self, plane: np.ndarray, geometry: Geometry) -> Prediction:
        """(S, S) probabilities in the frame -> Prediction at the original size; thread-safe."""
        prob = geometry.restore(plane)  # (orig_h, orig_w)
        post = self.postprocessor
        return Prediction(prob=prob, mask=postprocess_cropped(post, prob),
                          hole_free=type(post) is Postprocessor and post.fill_holes)

    def finish_windowed(self, plane: np.ndarray, geometry: Geometry) -> Prediction:
        """``finish`` for the worker: the same mask (bit for bit with OpenCV
        4.12 and later: ``restore_window``), but the
        probabilities are restored and postprocessed only in the windows
        where they can exceed the threshold (``windows``: one per place where
        something was found), and are 0 elsewhere (unless the windows span
        the image's width: below); ``prob`` equals
        ``finish``'s wherever the mask is, which is all that the statistics
        read. For an image where the network found nothing there is nothing
        to do; for a small tumor on a 3000x2500 radiograph ~1 ms instead of
        ~10-25. When the windows' widths add up to the image's, the whole
        image is restored at once (``restore_window`` costs a window's width
        times the image's height). ``Prediction.windows`` and
        ``window_probs`` let ``tumor_statistics`` read only the windows too;
        the full-size ``prob`` is made only if it is read."""
        g, post = geometry, self.postprocessor
        if type(post) is not Postprocessor or g.orig_h < g.scaled_h or g.orig_w < g.scaled_w:
            return self.finish(plane, geometry)
        found = windows(plane, g, post.threshold, _min_area(post, g.orig_h * g.orig_w))
        mask = np.zeros((g.orig_h, g.orig_w), np.uint8)
        if sum(right - left for _, _, left, right in found) >= g.orig_w:
            # each window's second pass costs its width times the image's height: here more than the whole image
            prob = geometry.restore(plane)
            probs = [prob[top:bottom, left:right] for top, bottom, left, right in found]
        else:
            prob = None  # made from the windows if someone reads it (Prediction.prob)
            across = restore_across(plane, g) if found else None
            probs = [restore_window(plane, g, bounds, across) for bounds in found]
        regions, min_area = [], _min_area(post, mask.size)
        for (top, bottom, left, right), window in zip(found, probs):  # each region and its holes lie in one window
            # cleaned whole: the box of what is above the threshold is nearly all of a window (99% on a trained
            # network's), so finding it (postprocess_cropped) cost more than it saved
            above = np.greater(window, post.threshold).view(np.uint8)
            cleaned, n = clean_regions_counted(above, min_area, post.fill_holes, zero_one=True)
            mask[top:bottom, left:right] = cleaned  # the windows are disjoint (windows(): _merge_overlapping)
            regions.append(n)
        return Prediction(prob=prob, mask=mask, windows=found, window_probs=probs, hole_free=post.fill_holes,
                          window_regions=regions, zero_one=True)

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Gray (H, W) images, any size and dtype -> one Prediction each, in order."""
        results = []
        for start in range(0, len(images), self.batch_size):
            prepared = [self.prepare(image) for image in images[start : start + self.batch_size]]
            planes = self.forward([frame for frame, _ in prepared])  # (n, S, S)
            results.extend(self.finish(plane, geometry) for plane, (_, geometry) in zip(planes, prepared))
        return results

    def warmup(self, batch_size: int | None = None) -> None:
        """One forward pass on zeros, so the first real chunk does not pay for
        CUDA context, cuDNN autotuning or compilation."""
        size = self.preprocessor.size
        self.predict_batch_tensor(torch.zeros(batch_size or self.batch_size, 1, size, size))
        if self.cuda:
            torch.cuda.synchronize(self.device)
