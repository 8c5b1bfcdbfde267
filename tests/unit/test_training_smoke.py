"""Losses, split, augmentation and a tiny end-to-end training run (CPU, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.network import AttentionUNet, UNetConfig
from model.preprocess import Preprocessor, to_unit_float
from training.losses import DiceFocalLoss, focal_loss, soft_dice_loss
from training.split import stratified_split
from training.synthetic import generate_dataset, synthetic_radiograph
from training.train import THRESHOLDS, TrainConfig, augment, main as train_main, train


# ---------------------------------------------------------------- losses


def test_dice_focal_loss_prefers_the_right_answer():
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:10, 4:10] = 1
    loss = DiceFocalLoss()
    right = loss(target * 20 - 10, target)
    wrong = loss(10 - target * 20, target)
    unsure = loss(torch.zeros_like(target), target)
    assert right < unsure < wrong
    assert right < 0.01


def test_losses_stay_finite_without_any_tumor():
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    empty = torch.zeros(2, 1, 8, 8)
    total = DiceFocalLoss(dice_weight=2.0, focal_weight=0.5, alpha=0.25)(logits, empty)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()
    assert soft_dice_loss(torch.full((1, 1, 4, 4), -20.0), torch.zeros(1, 1, 4, 4)) < 1e-6


def test_focal_with_gamma_zero_is_plain_bce():
    logits, target = torch.randn(1, 1, 8, 8), (torch.rand(1, 1, 8, 8) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), bce)
    assert focal_loss(logits, target, gamma=2.0) < bce


def test_dice_focal_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="weights"):
        DiceFocalLoss(dice_weight=0, focal_weight=0)
    with pytest.raises(ValueError, match="alpha"):
        DiceFocalLoss(alpha=1.5)
    with pytest.raises(ValueError, match="differ in shape"):
        DiceFocalLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


# ---------------------------------------------------------------- split


def test_stratified_split_is_seeded_disjoint_and_stratified():
    strata = ["osteochondroma"] * 50 + ["osteosarcoma"] * 20 + ["normal"] * 10 + ["other mt"] * 1
    train_idx, val_idx = stratified_split(strata, 0.2, seed=4)
    assert sorted(train_idx + val_idx) == list(range(len(strata)))
    assert not set(train_idx) & set(val_idx)
    val_counts = {k: sum(strata[i] == k for i in val_idx) for k in set(strata)}
    assert val_counts == {"osteochondroma": 10, "osteosarcoma": 4, "normal": 2, "other mt": 0}
    assert stratified_split(strata, 0.2, seed=4) == (train_idx, val_idx)
    assert stratified_split(strata, 0.2, seed=5) != (train_idx, val_idx)
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(strata, 1.0)


# ---------------------------------------------------------------- data path


def test_training_zscore_matches_the_serving_preprocessor():
    image, _, _ = synthetic_radiograph(np.random.default_rng(2), 90, 140)
    unit_frame, g = Preprocessor(64)(to_unit_float(image))
    served, g2 = Preprocessor(64, mean=0.3, std=0.2)(image)
    assert g == g2
    np.testing.assert_allclose((unit_frame - 0.3) / 0.2, served, rtol=1e-5, atol=1e-5)


def test_augment_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:50] = 1
    image = mask.astype(np.float32)
    for _ in range(10):
        aug_image, aug_mask = augment(image, mask, rng, max_rotation=15)
        assert aug_image.shape == aug_mask.shape == (64, 64)
        assert aug_image.min() >= 0 and aug_image.max() <= 1
        assert np.mean((aug_image > 0.5) == (aug_mask == 1)) > 0.97


# ---------------------------------------------------------------- training


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pairs = [synthetic_radiograph(rng, 64, 64, n_lesions=1)[:2] for _ in range(4)]
    x = torch.from_numpy(np.stack([(p[0] / 255.0 - 0.25) / 0.25 for p in pairs]).astype(np.float32))[:, None]
    y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32))[:, None]
    network = AttentionUNet(UNetConfig(filters=(4, 8, 16), dropout=0.0))
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    loss_fn = DiceFocalLoss()
    losses = []
    for _ in range(25):
        loss = loss_fn(network(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_tiny_training_run_writes_a_loadable_self_describing_checkpoint(tmp_path, capsys):
    data = generate_dataset(tmp_path / "data", 12, seed=0, min_side=48, max_side=96)
    out = tmp_path / "tiny.pt"
    cfg = TrainConfig(data=str(data), out=str(out), size=32, filters=(4, 8), dropout=0.0,
                      epochs=2, batch_size=4, val_fraction=0.25, seed=0, label="synthetic, not for clinical use")
    assert train(cfg) == out
    loaded = load_checkpoint(out)
    assert loaded.label == "synthetic, not for clinical use"
    assert loaded.version.startswith("tiny-")
    assert loaded.preprocessor.size == 32 and loaded.preprocessor.std > 0
    assert 0.2 < loaded.preprocessor.mean < 0.6  # measured on the training images, not a default
    assert loaded.postprocessor.threshold in THRESHOLDS
    assert loaded.network.config.filters == (4, 8)
    assert loaded.info["training_config"]["epochs"] == 2
    assert loaded.info["data"]["n_train"] + loaded.info["data"]["n_val"] == 12
    assert "synthetic" in loaded.info["data_license"]
    assert 0.0 <= loaded.metrics["validation"]["dice"] <= 1.0
    assert loaded.metrics["threshold"] == loaded.postprocessor.threshold
    lines = [json.loads(s) for s in out.with_name("tiny.metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == [1, 2]
    assert all(0.0 <= row["val_dice"] <= 1.0 for row in lines)


    assert train_main(["--evaluate", str(out), "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert loaded.version in printed and '"dice"' in printed


def test_train_command_rejects_missing_data_and_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="no data"):
        train_main(["--out", str(tmp_path / "x.pt")])
    with pytest.raises(ValueError, match="not divisible"):
        train_main(["--data", str(tmp_path), "--size", "100", "--filters", "4,8,16,32"])
