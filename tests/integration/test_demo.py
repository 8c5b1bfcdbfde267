"""`python3 run.py demo` (bonedetect demo) end to end, on the embedded default:
the synthetic batch, and real radiographs from a folder in BTXRD's layout
(here a synthetic one, so CI does not need BTXRD)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from bonedetect.demo import btxrd_batch, run_demo
from bonedetect.settings import Settings
from training.synthetic import generate_dataset


def test_btxrd_batch_takes_real_files_with_their_outlines(tmp_path):
    root = generate_dataset(tmp_path / "btxrd", 10, seed=3, min_side=64, max_side=128)
    files, truth, where = btxrd_batch(str(root), 4)
    assert "the whole folder" in where, "synthetic ids are not in the grouped split's test part"
    assert len(files) == 5 and files[-1][0] == "corrupt-truncated.jpg"
    for name, data in files[:-1]:
        assert (root / "images" / name).read_bytes() == data, "sent as stored, not re-encoded"
        with Image.open(root / "images" / name) as im:
            assert truth[name].shape == (im.height, im.width)
    assert any(m.any() for m in truth.values())


def test_demo_segments_a_btxrd_layout_folder_and_reports_dice(tmp_path, capsys, monkeypatch):
    root = generate_dataset(tmp_path / "btxrd", 8, seed=4, min_side=160, max_side=320)
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"BONEDETECT_HOME": str(tmp_path / "var")})
    assert run_demo(settings, n_images=3, port=0, serve=False, data=str(root)) == 0
    out = capsys.readouterr().out
    assert "job done_with_errors" in out and "radiologists' outline" in out
    assert "corrupt-truncated.jpg" in out and "failed" in out
    rows = [line for line in out.splitlines() if line.startswith("IMG")]
    assert len(rows) == 3 and all(" done " in line for line in rows)
    assert all(np.isfinite(float(line.split()[-1])) for line in rows), "a Dice for every image"
