"""A short training run on synthetic BTXRD learns, and the checkpoint it exports
is served unchanged by a real worker through the API (PostgreSQL + Redis)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from model.checkpoint import load_checkpoint
from model.inference import Segmenter
from training.btxrd import load_image, load_mask, read_btxrd
from training.synthetic import generate_dataset
from training.train import preset, train

# Easy synthetic images: lesion types that are brighter than their surroundings, drawn three times
# their usual size, at 64 px, so that a small network learns them in about 25 s on a quiet 2-core
# CPU (measured: validation Dice 0.80-0.82 and held-out Dice 0.79-0.82 over training seeds 0-2).
EASY = dict(tumor_types=("osteochondroma", "synovial osteochondroma"), lesion_scale=3.0, min_side=64, max_side=64)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    data = generate_dataset(root / "data", 320, seed=0, **EASY)
    held_out = generate_dataset(root / "held-out", 60, seed=7, **EASY)
    t0 = time.perf_counter()
    out = train(preset("thesis", data=str(data), test=str(held_out), out=str(root / "learned.pt"), size=64,
                       filters=(16, 32, 64), dropout=0.0, lr=1e-2, batch_size=8, epochs=24, schedule="cosine",
                       early_stop=0, output_prior=0.01, max_rotation=10.0, zoom=0.1, progress=False,
                       tensorboard=False))
    return out, time.perf_counter() - t0


def test_a_short_training_run_learns_the_synthetic_lesions(learned):
    path, seconds = learned
    loaded = load_checkpoint(path)
    validation, held_out = loaded.metrics["validation"], loaded.metrics["test"]  # original resolution, serving path
    print(f"trained in {seconds:.0f}s: validation Dice {validation['dice']:.3f} ({validation['n_images']} images), "
          f"held-out Dice {held_out['dice']:.3f} ({held_out['n_images']} images)")
    assert validation["n_images"] >= 50 and held_out["n_images"] == 60
    assert validation["dice"] > 0.7, validation
    # the best epoch was picked on validation; a set it never saw must agree
    assert held_out["dice"] > 0.7, held_out


@pytest.mark.integration
def test_the_exported_checkpoint_is_served_by_a_worker_through_the_api(learned, start_system, pg_url, redis_url,
                                                                         tmp_path, monkeypatch):
    path, _ = learned
    loaded = load_checkpoint(path)
    monkeypatch.setenv("MODEL_CHECKPOINT", str(path))
    system = start_system(pg_url, redis_url)
    held_out = read_btxrd(generate_dataset(tmp_path / "new", 12, seed=7, **EASY))  # images it never saw
    files, truth, expected = [], {}, {}
    segmenter = Segmenter(loaded)
    for record in held_out.records:
        image = load_image(record)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")  # lossless: the worker decodes exactly these pixels
        name = f"{record.image_id}.png"
        files.append((name, buf.getvalue()))
        truth[name] = load_mask(record, image.shape)
        expected[name] = segmenter.predict([image])[0].mask

    client = system.client("a")
    job = client.submit(files, label="trained checkpoint")
    final = client.wait(job["job_id"], timeout=300)
    assert final["status"] == "done" and final["counts"]["done"] == len(files)
    # the worker loaded the exported file; a CPU worker with lazy overlays says it decodes large JPEGs smaller
    assert final["model_versions"] == [loaded.version + "+jpeg-reduced"]
    dices = []
    for im in client.images(job["job_id"]):
        mask = np.array(Image.open(io.BytesIO(client.mask_png(im["image_id"])))) > 0
        # served unchanged: the same masks as the checkpoint gives here (thread counts may move a
        # probability by a rounding error, so a pixel at the threshold may flip)
        assert np.mean(mask == (expected[im["filename"]] > 0)) > 0.999
        gt = truth[im["filename"]] > 0
        dices.append(1.0 if not gt.any() and not mask.any() else 2 * (mask & gt).sum() / (mask.sum() + gt.sum()))
    assert np.mean(dices) > 0.5, dices
