"""A zip archive in a submission (a study folder with its DICOMDIR) becomes one
image row per member file; junk is skipped; bad members fail alone with their
reason; zip bombs are refused from the central directory, before anything is
decompressed or stored."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from tests.api.conftest import build_api, jpeg_bytes, png_bytes

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def study_folder() -> Path:
    """pydicom's bundled DICOMDIR test set: 3 patients' studies (CR, CT, MR) and their DICOMDIR."""
    path = get_testdata_file("dicomdirtests/DICOMDIR", download=False)
    if path is None:
        pytest.skip("pydicom's bundled dicomdirtests are not installed")
    return Path(path).parent


def zip_of(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            if name.endswith("/"):
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, data)
    return buf.getvalue()


def test_study_folder_zip_becomes_one_row_per_dicom_file(api):
    root = study_folder()
    # the studies (and TINY_ALPHA, a second set with its own DICOMDIR and a README), not the DICOMDIR variants at the top
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.parent != root and p.name != "DICOMDIR")
    members = {"DICOMDIR": (root / "DICOMDIR").read_bytes()}
    members.update({str(p.relative_to(root)): p.read_bytes() for p in files})
    members["__MACOSX/77654033/._6154"] = b"\x00\x05\x16\x07resource fork"
    members[".DS_Store"] = b"Bud1"
    members["77654033/"] = b""
    res = api.submit([("study.zip", zip_of(members)), ("loose.png", png_bytes())], fields=[("external_id", "ACC-1"), ("external_id", "ACC-2")])
    assert res.status_code == 202, res.json
    body = res.json
    assert body["image_count"] == len(files) + 1, "DICOMDIRs, the directory, __MACOSX and dotfiles are skipped"
    assert [(r["filename"], r["error"][:21]) for r in body["rejected"]] == [("study.zip/TINY_ALPHA/README", "unsupported file type")]

    rows = api.rows(body["job_id"])
    assert [r.position for r in rows] == list(range(len(files) + 1))
    assert sorted(r.filename for r in rows[:-1]) == sorted(f"study.zip/{p.relative_to(root)}" for p in files)
    dicoms = [r for r in rows[:-1] if r.status == "queued"]
    assert len(dicoms) == len(files) - 1
    for row in dicoms:
        assert row.content_type == "application/dicom" and row.external_id == "ACC-1"
        original = (root / row.filename.removeprefix("study.zip/")).read_bytes()
        assert api.blobs.get_bytes(row.blob_key) == original and row.size_bytes == len(original)
    assert rows[-1].filename == "loose.png" and rows[-1].external_id == "ACC-2" and rows[-1].content_type == "image/png"
    assert sorted(i for chunk in api.broker.chunks for i in chunk) == sorted(r.id for r in rows if r.status == "queued")


def test_bad_members_fail_alone_with_their_reason(api):
    inner = zip_of({"a.png": png_bytes()})
    good = zip_of({"ok.jpg": jpeg_bytes(), "nested.zip": inner, "notes.txt": b"hello", "corrupt.png": png_bytes(seed=1)})
    # Flip bytes inside corrupt.png's compressed data: its CRC check fails while it streams.
    start = good.index(b"corrupt.png") + len(b"corrupt.png") + 40
    broken = good[:start] + bytes(b ^ 0xFF for b in good[start : start + 8]) + good[start + 8 :]
    res = api.submit([("batch.zip", broken), ("not-a-zip.zip", b"PK\x03\x04 truncated")])
    assert res.status_code == 202, res.json
    rows = {r.filename: r for r in api.rows(res.json["job_id"])}
    assert rows["batch.zip/ok.jpg"].status == "queued"
    assert "zip archive inside a zip archive" in rows["batch.zip/nested.zip"].error
    assert "unsupported file type" in rows["batch.zip/notes.txt"].error
    assert rows["batch.zip/corrupt.png"].status == "failed"
    assert "zip" in rows["batch.zip/corrupt.png"].error and rows["batch.zip/corrupt.png"].blob_key is None
    assert rows["not-a-zip.zip"].error.startswith("not a readable zip archive")
    assert {r["filename"] for r in res.json["rejected"]} == set(rows) - {"batch.zip/ok.jpg"}


def test_empty_archive_is_one_failed_row(api):
    res = api.submit([("empty.zip", zip_of({"DICOMDIR": b"x", "dir/": b""}))])
    assert res.status_code == 202
    (row,) = api.rows(res.json["job_id"])
    assert row.status == "failed" and "holds no files" in row.error


@pytest.fixture
def small_api(tmp_path, sqlite_url):
    built = build_api(tmp_path, sqlite_url, MAX_FILE_BYTES=str(1024 * 1024), MAX_REQUEST_BYTES=str(8 * 1024 * 1024), MAX_FILES_PER_JOB="5")
    yield built
    built.close()


def stored_files(api) -> list[Path]:
    return [p for p in Path(api.blobs.root).rglob("*") if p.is_file()]


def test_zip_bomb_member_fails_without_being_expanded(small_api):
    bomb = zip_of({"bomb.png": b"\0" * (3 * 1024 * 1024), "ok.png": png_bytes()})  # 3 MiB of zeros: ~3 KiB zipped
    assert len(bomb) < 20_000
    res = small_api.submit([("bomb.zip", bomb)])
    assert res.status_code == 202, res.json
    rows = {r.filename: r for r in small_api.rows(res.json["job_id"])}
    assert rows["bomb.zip/bomb.png"].status == "failed" and "above the limit of 1048576 bytes" in rows["bomb.zip/bomb.png"].error
    assert rows["bomb.zip/ok.png"].status == "queued"
    assert len(stored_files(small_api)) == 1, "only the good member reached the blob store"


def test_archive_over_the_expansion_limit_is_refused_whole(tmp_path, sqlite_url):
    api = build_api(tmp_path, sqlite_url, MAX_FILE_BYTES=str(1024 * 1024), MAX_REQUEST_BYTES=str(6 * 1024 * 1024))
    try:
        member = b"\0" * (1024 * 1024 - 10)  # under the file limit; ~1 KiB zipped
        a = zip_of({f"a{i}.png": member for i in range(4)})
        b = zip_of({f"b{i}.png": member for i in range(3)})  # 7 MiB in all: over the 6 MiB limit
        res = api.submit([("a.zip", a), ("b.zip", b)])
        assert res.status_code == 413, res.json
        assert "archive 'b.zip' expands to" in res.json["error"] and "6291456 bytes" in res.json["error"]
        assert stored_files(api) == [], "nothing of a refused submission stays in the blob store"
        assert api.client.get("/v1/jobs", headers=api.auth()).json["jobs"] == []
    finally:
        api.close()


def test_archive_over_the_file_count_is_refused_whole(small_api):
    res = small_api.submit([("many.zip", zip_of({f"{i}.png": png_bytes(seed=i) for i in range(6)}))])
    assert res.status_code == 400
    assert "many.zip" in res.json["error"] and "limit of 5 per job" in res.json["error"]
    assert stored_files(small_api) == []


def test_in_parts_the_file_count_limits_each_request_and_says_so(small_api):
    from bonedetect.client import encode_multipart

    opened = small_api.submit([], fields=[("open", "true")])
    assert opened.status_code == 202, opened.json
    job_id = opened.json["job_id"]

    def part(files):
        body, ctype = encode_multipart([], [("files", name, data) for name, data in files])
        return small_api.client.post(f"/v1/jobs/{job_id}/images", data=body,
                                     headers={**small_api.auth(), "Content-Type": ctype})

    many = zip_of({f"{i}.png": png_bytes(seed=i) for i in range(6)})
    refused = part([("many.zip", many)])
    assert refused.status_code == 400
    assert "many.zip" in refused.json["error"] and "the request would have 6, above the limit of 5 per request" in refused.json["error"]
    too_many = part([(f"{i}.png", png_bytes(seed=i)) for i in range(6)])
    assert too_many.status_code == 400 and too_many.json["error"] == "6 files is above the limit of 5 per request"
    for k in range(2):  # the limit is per request: two parts of 4 make a job of 8
        ok = part([("four.zip", zip_of({f"{k}-{i}.png": png_bytes(seed=10 * k + i) for i in range(4)}))])
        assert ok.status_code == 202, ok.json
    assert ok.json["image_count"] == 4 and ok.json["first_position"] == 4


def test_zip_larger_than_one_file_is_accepted_when_its_members_fit(small_api):
    import numpy as np

    noise = [np.random.default_rng(i).integers(0, 255, 700 * 1024, dtype=np.uint8).tobytes() for i in range(2)]
    # Incompressible members under the 1 MiB file limit: the archive itself is over it.
    members = {f"n{i}.dcm": b"\0" * 128 + b"DICM" + data for i, data in enumerate(noise)}
    archive = zip_of(members, compression=zipfile.ZIP_STORED)
    assert len(archive) > 1024 * 1024
    res = small_api.submit([("big.zip", archive)])
    assert res.status_code == 202, res.json
    assert [r.status for r in small_api.rows(res.json["job_id"])] == ["queued", "queued"]
