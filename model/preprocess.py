"""Preprocessing shared by training and serving: what was measured is what runs.

A radiograph of any size becomes one ``size x size`` float32 frame:

1. ``to_unit_float``: pixel values to [0, 1] (see its docstring for each dtype).
2. Resize so the long side is ``size``, keeping the aspect ratio
   (``cv2.INTER_AREA`` when shrinking, ``cv2.INTER_LINEAR`` when growing).
3. Zero-pad (black) to ``size x size``, the image centred; ``Geometry`` records
   where it went so a probability map can be put back at the original size.
4. z-score with the checkpoint's constants ``mean`` and ``std`` (measured on
   the training images after step 1), padding included.

Masks follow the same geometry with nearest-neighbour resampling
(``Preprocessor.resize_mask``); network outputs go back with
``Geometry.restore`` (crop, then bilinear resize).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

# Percentiles of the intensity window for images with more than 8 bits.
WINDOW_LOW, WINDOW_HIGH = 0.5, 99.5


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """Map a gray image to float32 in [0, 1].

    - ``bool``: False/True -> 0.0/1.0.
    - integers within [0, 255] (``uint8`` and 8-bit data in wider types): ``/ 255``.
    - other integers (``uint16`` 12/16-bit radiographs, signed data): a robust
      window, ``(x - p0.5) / (p99.5 - p0.5)`` clipped to [0, 1], so a few
      hot or dead pixels do not squash the contrast; min-max when those two
      percentiles coincide.
    - floats already within [0, 1]: unchanged, as float32 (the input array
      itself when it is float32; applying this twice is harmless); other
      floats: min-max to [0, 1].
    - a constant image that needs rescaling becomes all zeros.

    Args:
        pixels: (H, W) array; an (H, W, 1) array is accepted as (H, W).

    Raises:
        ValueError: for colour (H, W, 3) or other non-2-D input, an empty
            image, an unsupported dtype, or NaN/inf values.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim != 2:
        raise ValueError(f"expected a gray (H, W) image, got shape {pixels.shape} (decode colour images to gray first)")
    if pixels.size == 0:
        raise ValueError(f"empty image of shape {pixels.shape}")
    if pixels.dtype == np.bool_:
        return pixels.astype(np.float32)
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / np.float32(255)
    if np.issubdtype(pixels.dtype, np.integer):
        lo, hi = int(pixels.min()), int(pixels.max())
        if lo >= 0 and hi <= 255:
            return pixels.astype(np.float32) / np.float32(255)
        p_lo, p_hi = np.percentile(pixels, [WINDOW_LOW, WINDOW_HIGH])
        if p_hi <= p_lo:
            p_lo, p_hi = lo, hi
        return _rescale(pixels, float(p_lo), float(p_hi))
    if np.issubdtype(pixels.dtype, np.floating):
        lo, hi = float(pixels.min()), float(pixels.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("image contains NaN or infinite values")
        if lo >= 0.0 and hi <= 1.0:
            return pixels.astype(np.float32, copy=False)
        return _rescale(pixels, lo, hi)
    raise ValueError(f"unsupported pixel dtype {pixels.dtype}")


def _rescale(pixels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(pixels.shape, np.float32)
    out = (pixels.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


@functools.lru_cache(maxsize=64)  # keyed on sizes and device; a few kB each
def area_taps(dst: int, src: int, device=None):
    """OpenCV's INTER_AREA averaging ``src`` pixels down to ``dst`` as taps:
    ((dst, K) int64 source indices, (dst, K) float32 weights) on ``device``,
    destination pixel i being the weighted sum of its K source pixels. Source
    pixel j covers [j, j + 1), destination pixel i covers
    [i * src / dst, (i + 1) * src / dst); a weight is the overlap's share
    (computed in float64), and each row's weights sum to 1. K is the most
    source pixels one destination pixel touches (ceil(src / dst) + 1 at
    most); a row with fewer repeats its last index with weight 0."""
    import torch

    scale = src / dst
    lo = torch.arange(dst, dtype=torch.float64, device=device) * scale
    hi = torch.arange(1, dst + 1, dtype=torch.float64, device=device) * scale
    first = torch.floor(lo).to(torch.int64)
    count = torch.clamp(torch.ceil(hi).to(torch.int64), max=src) - first
    k = int(count.max())
    j = first[:, None] + torch.arange(k, device=device)  # (dst, K) candidate source pixels
    overlap = torch.minimum(hi[:, None], j + 1) - torch.maximum(lo[:, None], j.to(torch.float64))
    weights = (overlap.clamp_min_(0) / scale).to(torch.float32)
    index = torch.clamp(j, max=src - 1)
    if index.is_cuda:  # cached for every thread's stream: complete before any other stream reads it
        torch.cuda.current_stream(index.device).synchronize()
    return index, weights


@dataclass(frozen=True)
class Geometry:
    """How one (orig_h, orig_w) image was placed into the size x size frame:
    scaled to (scaled_h, scaled_w), its top-left corner at (top, left)."""

    orig_h: int
    orig_w: int
    scaled_h: int
    scaled_w: int
    size: int
    top: int
    left: int

    def restore(self, plane: np.ndarray) -> np.ndarray:
        """(size, size) map in the frame -> (orig_h, orig_w) float32: crop the
        padding off, then resize bilinearly to the original size."""
        plane = np.asarray(plane)
        if plane.shape != (self.size, self.size):
            raise ValueError(f"expected a ({self.size}, {self.size}) plane, got shape {plane.shape}")
        crop = plane[self.top : self.top + self.scaled_h, self.left : self.left + self.scaled_w].astype(np.float32)
        if crop.shape == (self.orig_h, self.orig_w):
            return crop.copy()
        return cv2.resize(crop, (self.orig_w, self.orig_h), interpolation=cv2.INTER_LINEAR)


class Preprocessor:
    """Radiograph -> z-scored ``size x size`` frame (module docstring: the steps).

    Args:
        size: side of the square frame the network sees; must suit the
            network (divisible by ``UNetConfig.multiple``).
        mean: mean of the training images after ``to_unit_float``.
        std: their standard deviation (> 0).
    """

    def __init__(self, size: int = 512, mean: float = 0.0, std: float = 1.0):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not math.isfinite(mean):
            raise ValueError(f"mean must be finite, got {mean!r}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be positive and finite, got {std!r}")
        self.size, self.mean, self.std = size, float(mean), float(std)

    def geometry(self, h: int, w: int) -> Geometry:
        if h < 1 or w < 1:
            raise ValueError(f"image must be at least 1x1, got {h}x{w}")
        scale = self.size / max(h, w)
        scaled_h = min(self.size, max(1, round(h * scale)))
        scaled_w = min(self.size, max(1, round(w * scale)))
        top, left = (self.size - scaled_h) // 2, (self.size - scaled_w) // 2
        return Geometry(int(h), int(w), scaled_h, scaled_w, self.size, top, left)

    def __call__(self, pixels: np.ndarray, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, Geometry]:
        """Gray (H, W) image of any dtype -> ((size, size) float32 frame, Geometry).

        ``shape``: the (H, W) of the radiograph when ``pixels`` are a reduced
        decode of it by a whole factor (worker.decode.decode_image's
        long_side): H and W that factor times the pixels' sides. The Geometry
        is then the full image's, so ``Geometry.restore`` returns to full
        size, and the frame is the pixels shrunk (INTER_AREA) to the full
        image's place in it. Other shapes, and pixels smaller than that
        place either way, are refused."""
        unit = to_unit_float(pixels)
        g = self.geometry(*(shape or unit.shape))
        if shape is not None:
            (H, W), (h, w) = shape, unit.shape
            if H % h or W % w or H // h != W // w:
                raise ValueError(f"pixels of shape {unit.shape} are not the image of {H}x{W} reduced by a whole factor")
            if h < g.scaled_h or w < g.scaled_w:
                raise ValueError(f"pixels of shape {unit.shape} are smaller than the frame's {g.scaled_h}x{g.scaled_w} "
                                 f"for an image of {H}x{W}")
        frame = np.zeros((self.size, self.size), np.float32)
        frame[g.top : g.top + g.scaled_h, g.left : g.left + g.scaled_w] = self._resize(unit, g)
        frame -= np.float32(self.mean)
        frame /= np.float32(self.std)
        return frame, g

    def prepare_tensor(self, pixels):
        """``self(pixels)`` for an 8-bit gray image already in a torch tensor
        ((H, W) uint8, e.g. decoded by nvJPEG on the GPU), computed where the
        tensor is: -> ((size, size) float32 tensor on the same device, Geometry).

        The same resampling as OpenCV's: shrinking is INTER_AREA's exact
        area average, rows then columns, each output pixel the weighted sum
        of the few source pixels it overlaps (``area_taps``: 7 of a
        3000x2500 radiograph's per side for a 512 frame, ~20 MFLOP; as two
        dense matrix products with the overlaps, before, it was 7.7 GFLOP of
        float32, a fifth of the network's time per image on an H100 by the
        FLOPs), enlarging is bilinear with half-pixel centres. Frames agree
        with ``self(pixels)`` to float rounding.
        """
        import torch
        import torch.nn.functional as F

        if pixels.dtype != torch.uint8 or pixels.dim() != 2 or pixels.numel() == 0:
            raise ValueError(f"prepare_tensor takes a non-empty (H, W) uint8 tensor, got {pixels.dtype} {tuple(pixels.shape)}")
        g = self.geometry(*pixels.shape)
        unit = pixels.to(torch.float32).div_(255.0)
        if (g.scaled_h, g.scaled_w) != (g.orig_h, g.orig_w):
            if g.scaled_h * g.scaled_w < g.orig_h * g.orig_w:  # shrinking, as _resize decides
                rows, row_weights = area_taps(g.scaled_h, g.orig_h, pixels.device)
                cols, col_weights = area_taps(g.scaled_w, g.orig_w, pixels.device)
                if unit.is_cuda:  # the cache's tensors are used on this stream too: not reused before it is done
                    for t in (rows, row_weights, cols, col_weights):
                        t.record_stream(torch.cuda.current_stream(unit.device))
                # rows a tap at a time (a (scaled_h, K, W) gather would be 72 MB for a 3000x2500 radiograph)
                shrunk = unit.index_select(0, rows[:, 0]).mul_(row_weights[:, :1])
                for t in range(1, rows.shape[1]):
                    shrunk.addcmul_(unit.index_select(0, rows[:, t]), row_weights[:, t : t + 1])
                unit = (shrunk[:, cols] * col_weights).sum(2)  # (scaled_h, scaled_w, K) -> (scaled_h, scaled_w)
            else:
                unit = F.interpolate(unit[None, None], size=(g.scaled_h, g.scaled_w), mode="bilinear",
                                     align_corners=False)[0, 0]
        frame = torch.zeros((self.size, self.size), dtype=torch.float32, device=pixels.device)
        frame[g.top : g.top + g.scaled_h, g.left : g.left + g.scaled_w] = unit
        return frame.sub_(self.mean).div_(self.std), g

    def resize_mask(self, mask: np.ndarray, geometry: Geometry) -> np.ndarray:
        """(orig_h, orig_w) mask (nonzero = tumor) -> (size, size) uint8 {0, 1},
        nearest-neighbour, placed like the image."""
        mask = np.asarray(mask)
        if mask.shape != (geometry.orig_h, geometry.orig_w):
            raise ValueError(f"mask shape {mask.shape} does not match the image's ({geometry.orig_h}, {geometry.orig_w})")
        small = (mask != 0).astype(np.uint8)
        if small.shape != (geometry.scaled_h, geometry.scaled_w):
            # INTER_NEAREST_EXACT samples at pixel centres, like the bilinear restore.
            small = cv2.resize(small, (geometry.scaled_w, geometry.scaled_h), interpolation=cv2.INTER_NEAREST_EXACT)
        frame = np.zeros((geometry.size, geometry.size), np.uint8)
        frame[geometry.top : geometry.top + geometry.scaled_h, geometry.left : geometry.left + geometry.scaled_w] = small
        return frame

    def as_dict(self) -> dict:
        return {"size": self.size, "mean": self.mean, "std": self.std}

    def __repr__(self) -> str:
        return f"Preprocessor(size={self.size}, mean={self.mean:.6g}, std={self.std:.6g})"

    @staticmethod
    def _resize(unit: np.ndarray, g: Geometry) -> np.ndarray:
        if (g.scaled_h, g.scaled_w) == unit.shape:
            return unit
        shrinking = g.scaled_h * g.scaled_w < g.orig_h * g.orig_w
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return cv2.resize(unit, (g.scaled_w, g.scaled_h), interpolation=interpolation)
