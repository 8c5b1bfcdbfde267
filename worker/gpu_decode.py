"""Optional JPEG decoding on the GPU: nvJPEG through ``torchvision.io.decode_jpeg``.

On an H100 the network does about 1,800 images/s while OpenCV decodes a
3000x2500 JPEG at about 448 images/s on all 16 cores, and nvJPEG at 1,323
(DESIGN.md): CPU decoding is the first wall there. This module moves the
JPEG entropy decoding and IDCT to the GPU; the pixels then come back to host
memory only where something needs them there (below).

The decoded pixels stay on the GPU (``keep_on_device``, the default):
``Segmenter.prepare`` then resizes, pads and normalises them there
(``Preprocessor.prepare_tensor``, the same resampling as OpenCV's), the frame
goes to the network without a host round trip, and the worker's CPU does
nothing per image before the network. An eager overlay copies the pixels to
the host when it is drawn.

Selected by the GPU_DECODE setting (``Pipeline(gpu_decode=...)``):

- ``auto`` (default): the GPU when the network runs on CUDA and torchvision
  imports; the CPU otherwise (this project's CPU machines, and wherever the
  installed torchvision does not match torch).
- ``on``: the GPU or a ``ValueError`` saying why not.
- ``off``: always the CPU (``worker.decode.decode_image``).

torchvision is imported lazily, only here: it is not a dependency of the
project (PyPI's wheels are built against one torch release each; install
the torchvision that matches the worker's torch on GPU hosts).

Only plain JPEGs go to the GPU: complete (ending in the end-of-image
marker), baseline (not progressive), 8-bit grayscale or RGB, without an EXIF
rotation (nvJPEG on CUDA does not apply it), within the pixel limit, at least
``MIN_SIDE`` pixels a side. Everything else (PNG, DICOM, CMYK, progressive
JPEGs, a file nvJPEG rejects) is decoded on the CPU exactly as before, so the
user sees the same error messages. nvJPEG's IDCT and colour conversion are
not bit-identical to libjpeg-turbo's: pixels may differ by a grey level or
two, well below what changes a mask.

Decoded together (``decode_batch``; GPU_DECODE_BATCH=on, the default): the
pipeline hands nvJPEG a forward batch's plain JPEGs in one call, because of
how torchvision drives it (torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp,
0.19 and later). Every call holds one mutex for the whole process and ends
with a stream synchronisation, so calls from several threads run one after
another; on GPUs with JPEG engines (A100, H100) a call's baseline JPEGs go to
the engines as one batch (``nvjpegDecodeBatched``), one image per call using
one engine at a time. Progressive JPEGs are decoded there image by image with
the entropy decoding on the CPU, inside that mutex: one core for the whole
process, where the CPU decoder (``decode_image``) runs in every pool thread.
When a batched call fails (one file nvJPEG refuses fails the call), its
images are decoded one by one, so each gets its own outcome.
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Callable

import numpy as np
from PIL import Image

from bonedetect.settings import GPU_DECODE_MODES, choose
from worker.decode import MIN_SIDE, DecodedImage, decode_image

log = logging.getLogger("bonedetect.worker")

Decoder = Callable[[bytes, int], DecodedImage]  # (file bytes, max_pixels) -> DecodedImage; raises DecodeError


def gpu_decode_unavailable(device) -> str | None:
    """Why JPEGs cannot be decoded on ``device`` here, or None when they can."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return f"the network runs on {device.type}, not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as err:  # ImportError, or a torchvision built for another torch
        return f"torchvision.io.decode_jpeg does not import ({type(err).__name__}: {err})"
    return None


def select_decoder(mode: str, device) -> Decoder:
    """The decoder for GPU_DECODE=``mode`` with the network on ``device``."""
    choice = choose("GPU_DECODE", mode, GPU_DECODE_MODES)
    if choice == "off":
        return decode_image
    reason = gpu_decode_unavailable(device)
    if reason is None:
        log.info("JPEG decoding on %s (nvJPEG)", device)
        return GpuJpegDecoder(device)
    if choice == "on":
        raise ValueError(f"GPU_DECODE=on, but JPEGs cannot be decoded on the GPU: {reason}")
    log.info("JPEG decoding on the CPU: %s", reason)
    return decode_image


def _torchvision_decodes_lists() -> bool:
    """Whether the installed torchvision's decode_jpeg takes a list of files (0.19 and later)."""
    try:
        import torchvision

        major, minor = (int(part) for part in torchvision.__version__.split(".")[:2])
    except Exception:
        return False
    return (major, minor) >= (0, 19)


class GpuJpegDecoder:
    """``decode_image`` with plain JPEGs decoded on the GPU (module docstring).

    Args:
        device: the CUDA device the network runs on.
        gpu_decode: (uint8 tensor of the file's bytes) -> (1, H, W) uint8
            tensor, grayscale (files with an EXIF orientation go to the CPU); default
            ``torchvision.io.decode_jpeg`` on ``device``. Tests pass a CPU
            stand-in, since this machine has no GPU.
        gpu_decode_batch: a list of such tensors -> a list of such images, in one
            call (``decode_batch``); default ``torchvision.io.decode_jpeg`` with the
            list, or ``gpu_decode`` on each when only that is given.
        fallback: the CPU decoder for everything else.
    """

    def __init__(self, device, gpu_decode: Callable | None = None, fallback: Decoder = decode_image,
                 keep_on_device: bool = True, gpu_decode_batch: Callable | None = None):
        self.device = device
        self.keep_on_device = keep_on_device
        self.fallback = fallback
        self._gpu_decode = gpu_decode or self._torchvision_decode
        if gpu_decode_batch is None:
            batches = gpu_decode is None and _torchvision_decodes_lists()
            gpu_decode_batch = self._torchvision_decode if batches else self._one_by_one
        self._gpu_decode_batch = gpu_decode_batch
        self._lock = threading.Lock()
        self.gpu_images = 0  # how many went through the GPU (the benchmark reports it)
        self.cpu_images = 0

    def _torchvision_decode(self, data):
        """One tensor of a file's bytes, or a list of them (decoded in one call): torchvision's decode_jpeg."""
        from torchvision.io import ImageReadMode, decode_jpeg

        # EXIF-oriented files never come here (takes): on CUDA decode_jpeg ignores apply_exif_orientation
        return decode_jpeg(data, mode=ImageReadMode.GRAY, device=self.device)

    def _one_by_one(self, tensors):
        return [self._gpu_decode(t) for t in tensors]

    def _count(self, gpu: bool) -> None:
        with self._lock:
            if gpu:
                self.gpu_images += 1
            else:
                self.cpu_images += 1

    def __call__(self, data: bytes, max_pixels: int = 100_000_000) -> DecodedImage:
        if not self.takes(data, max_pixels):
            self._count(False)
            return self.fallback(data, max_pixels)
        import torch

        try:
            pixels = self._pixels(self._gpu_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8)))
        except Exception as err:  # nvJPEG refused it: the CPU decoder gives the user's reason
            log.debug("nvJPEG could not decode a JPEG (%s); decoding on the CPU", err)
            self._count(False)
            return self.fallback(data, max_pixels)
        self._count(True)
        return DecodedImage(pixels=pixels, format="JPEG")

    def decode_batch(self, files: list[bytes], max_pixels: int = 100_000_000) -> list[DecodedImage | Exception]:
        """Files that ``takes`` accepted, decoded in one nvJPEG call (module docstring): a DecodedImage
        each, in order, or the exception (a DecodeError with the user's reason) that decoding it alone
        raised. When the call fails, each file is decoded alone (``__call__``: the GPU, else the CPU)."""
        import torch

        if len(files) > 1:
            try:
                decoded = self._gpu_decode_batch([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in files])
                if len(decoded) != len(files):
                    raise RuntimeError(f"{len(decoded)} images decoded from {len(files)} files")
                images = [DecodedImage(pixels=self._pixels(one), format="JPEG") for one in decoded]
            except Exception as err:
                log.debug("nvJPEG could not decode %d JPEGs together (%s); decoding them one by one", len(files), err)
            else:
                for _ in images:
                    self._count(True)
                return images
        results: list[DecodedImage | Exception] = []
        for data in files:
            try:
                results.append(self(data, max_pixels))
            except Exception as err:
                results.append(err)
        return results

    def _pixels(self, decoded):
        pixels = decoded.reshape(decoded.shape[-2:])  # (H, W) uint8 on the device
        if not self.keep_on_device:
            pixels = np.ascontiguousarray(pixels.cpu().numpy(), dtype=np.uint8)
        return pixels

    @staticmethod
    def takes(data: bytes, max_pixels: int) -> bool:
        """Whether ``data`` goes to the GPU: a complete baseline 8-bit grayscale or RGB JPEG within the limits,
        without an EXIF rotation (reads the header only)."""
        if not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return False  # not a JPEG, or truncated (no end-of-image marker): the CPU decoder says why
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if im.getexif().get(0x0112, 1) not in (0, 1):
                    return False  # rotated or mirrored by EXIF: nvJPEG on CUDA ignores that, Pillow applies it
                if im.info.get("progressive"):
                    return False  # torchvision decodes these with the entropy decoding on one CPU core, under a lock
                return im.format == "JPEG" and im.mode in ("L", "RGB") and w * h <= max_pixels and min(w, h) >= MIN_SIDE
        except Exception:
            return False
