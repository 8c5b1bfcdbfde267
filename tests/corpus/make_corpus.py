"""The bad-input corpus: files and requests that must each get a clear answer.

manifest.json (next to this file) lists every file, the generator here that
makes it, the name it is uploaded under and its expected outcome; and every
malformed request with the 4xx JSON error it must get.
tests/faults/test_bad_input.py runs them all through the real HTTP API and a
real worker. The files are made, deterministically, by this script rather
than committed, so each one's construction is readable:

    python tests/corpus/make_corpus.py OUT_DIR     # writes the files and a copy of the manifest
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def _radiograph(seed: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit synthetic radiograph with drawn lesions, and its lesion mask."""
    from training.synthetic import synthetic_radiograph

    image, mask, _ = synthetic_radiograph(np.random.default_rng(seed), h, w)
    return image, mask


def _save(array: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    im = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


# -- one generator per "make" in the manifest: (seed) -> {file name suffix: bytes} ------------


def empty(seed: int) -> bytes:
    return b""


def text(seed: int) -> bytes:
    return b"Radiology request form\nThis is a text file with a .jpg name, not a radiograph.\n"


def truncated_jpeg(seed: int) -> bytes:
    image, _ = _radiograph(seed, 300, 400)
    data = _save(image, "JPEG", quality=92)
    return data[: len(data) // 3]  # the header is whole; the scan stops a third of the way in


def png_bomb_header(seed: int) -> bytes:
    """A valid PNG header claiming 30000 x 30000 8-bit gray (900 MB decoded) with a
    tiny body: refused on its header, before any pixel is decoded."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (30001 * 4))  # the first four rows only
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def one_pixel(seed: int) -> bytes:
    return _save(np.array([[128]], dtype=np.uint8), "PNG")


def png16(seed: int) -> bytes:
    image, _ = _radiograph(seed, 360, 420)
    return _save(image.astype(np.uint16) * 257, "PNG")  # full 16-bit range


def rgba_png(seed: int) -> bytes:
    image, _ = _radiograph(seed, 330, 400)
    rgba = np.dstack([image, image, image, np.full_like(image, 200)])
    return _save(Image.fromarray(rgba, "RGBA"), "PNG")


def cmyk_jpeg(seed: int) -> bytes:
    image, _ = _radiograph(seed, 340, 380)
    return _save(Image.fromarray(image).convert("RGB").convert("CMYK"), "JPEG", quality=92)


def exif_rotated_jpeg(seed: int) -> dict[str, bytes]:
    """A radiograph seen as 480 x 320 (w x h), stored on its side (320 x 480) with EXIF
    Orientation 6 ("rotate 90 degrees clockwise to display"). Also its lesion mask in
    the displayed frame (the `truth` file), where the results must be."""
    display, mask = _radiograph(seed, 320, 480)
    stored = np.rot90(display, k=1)  # 90 degrees counter-clockwise: what a sideways sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    data = _save(np.ascontiguousarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert shown.shape == display.shape, "Orientation 6 must display the upright picture"
    return {"": data, "truth": _save((mask > 0).astype(np.uint8) * 255, "PNG")}


def radiograph_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image, _ = _radiograph(seed, int(rng.integers(250, 400)), int(rng.integers(250, 400)))
    return _save(image, "PNG")


def radiograph_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image, _ = _radiograph(seed, int(rng.integers(250, 400)), int(rng.integers(250, 400)))
    return _save(image, "JPEG", quality=92)


GENERATORS = {f.__name__: f for f in (
    empty, text, truncated_jpeg, png_bomb_header, one_pixel, png16, rgba_png, cmyk_jpeg,
    exif_rotated_jpeg, radiograph_png, radiograph_jpeg,
)}  # fmt: skip


def upload_name(entry: dict) -> str:
    """The file name the client sends: `upload_as` (LONG:n is a name n characters long), else `file`."""
    name = entry.get("upload_as", entry["file"])
    if name.startswith("LONG:"):
        n = int(name.split(":")[1])
        return "r" * (n - 4) + ".png"
    return name


def build(out: Path) -> list[dict]:
    """Write every corpus file (and truth file) under `out`; returns the manifest's
    file entries with `path` (and `truth_path`) filled in."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for entry in load_manifest()["files"]:
        seed = zlib.crc32(entry["file"].encode())
        made = GENERATORS[entry["make"]](seed)
        made = made if isinstance(made, dict) else {"": made}
        path = out / entry["file"]
        path.write_bytes(made[""])
        entry = {**entry, "path": path, "upload_name": upload_name(entry)}
        if "truth" in entry:
            entry["truth_path"] = out / entry["truth"]
            entry["truth_path"].write_bytes(made["truth"])
        entries.append(entry)
    return entries


# -- malformed requests: (body, content type) per "send" in the manifest -------------------


def build_request(kind: str, limits: dict) -> tuple[bytes, str]:
    from bonedetect.client import encode_multipart

    png = radiograph_png(1)
    if kind == "no_file":
        return encode_multipart([("label", "nothing attached")], [])
    if kind == "wrong_field":
        return encode_multipart([], [("file", "knee.png", png)])
    if kind == "json_body":
        return json.dumps({"files": ["knee.png"]}).encode(), "application/json"
    if kind == "raw_image":
        return png, "image/png"
    if kind == "file_too_large":
        big = png + bytes(limits["MAX_FILE_BYTES"] + 1 - len(png))
        return encode_multipart([], [("files", "ok.png", png), ("files", "huge.png", big)])
    if kind == "request_too_large":
        part = png + bytes(limits["MAX_FILE_BYTES"] // 2)  # each file under its limit, the sum over the request's
        n = limits["MAX_REQUEST_BYTES"] // len(part) + 1
        return encode_multipart([], [("files", f"part-{i}.png", part) for i in range(n)])
    raise ValueError(f"unknown request kind {kind!r}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    target = Path(sys.argv[1])
    for e in build(target):
        print(f"{e['file']:24} {e['path'].stat().st_size:>8} bytes  -> {e['expect']}")
    shutil.copy(MANIFEST, target / "manifest.json")
