"""Losses, split, augmentation and a tiny end-to-end training run (CPU, seconds)."""

from __future__ import annotations

import dataclasses

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
from training.augment import AugmentConfig, affine_params, augment_batch
from training.train import (
    PRESETS,
    WIDE_THRESHOLDS,
    DeepSupervision,
    TrainConfig,
    augment,
    load_state,
    main as train_main,
    parse_args,
    preset,
    state_path,
    train,
)


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


def test_per_image_dice_weighs_a_missed_small_lesion_like_a_large_one():
    # image 0: an 8x8 lesion found exactly; image 1: a 2x2 lesion missed (logits +-20: P is 0 or 1 to 1e-8)
    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, 4:12, 4:12] = 1
    target[1, 0, 2:4, 2:4] = 1
    logits = torch.full_like(target, -20.0)
    logits[0, 0, 4:12, 4:12] = 20.0
    # pooled: 1 - (2*64 + 1) / (64 + 68 + 1); per image: (1 - 129/129 + 1 - 1/5) / 2
    assert soft_dice_loss(logits, target) == pytest.approx(4 / 133, abs=1e-6)
    assert soft_dice_loss(logits, target, per_image=True) == pytest.approx(0.4, abs=1e-6)
    assert DiceFocalLoss(1.0, 0.0, per_image=True)(logits, target) == pytest.approx(0.4, abs=1e-6)
    # one image: the two forms agree
    one = (logits[1:], target[1:])
    assert soft_dice_loss(*one, per_image=True) == pytest.approx(float(soft_dice_loss(*one)), abs=1e-7)
    assert parse_args(["--dice-per-image"])[0].dice_per_image is True
    assert parse_args([])[0].dice_per_image is False


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
                      epochs=2, batch_size=4, seed=0, label="synthetic, not for clinical use", progress=False)
    assert train(cfg) == out
    loaded = load_checkpoint(out)
    assert loaded.label == "synthetic, not for clinical use"
    assert loaded.version.startswith("tiny-")
    assert loaded.preprocessor.size == 32 and loaded.preprocessor.std > 0
    assert 0.2 < loaded.preprocessor.mean < 0.6  # measured on the training images, not a default
    assert loaded.postprocessor.threshold in WIDE_THRESHOLDS
    assert loaded.network.config.filters == (4, 8)
    assert loaded.info["training_config"]["epochs"] == 2
    assert loaded.info["training_config"]["config"] == "thesis"
    d = loaded.info["data"]
    assert d["n_train"] + d["n_val"] + d["n_test_in_split"] == 12 and d["n_test_in_split"] >= 1
    assert d["split"]["kind"] == "grouped" and len(d["train_ids"]) == d["n_train"]
    assert "synthetic" in loaded.info["data_license"]
    assert 0.0 <= loaded.metrics["validation"]["dice"] <= 1.0
    assert "grouped" in loaded.metrics["validation"]["split"]
    assert loaded.metrics["threshold"] == loaded.postprocessor.threshold
    lines = [json.loads(s) for s in out.with_name("tiny.metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == [1, 2]
    assert all(0.0 <= row["val_dice"] <= 1.0 for row in lines)

    assert train_main(["--evaluate", str(out), "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert loaded.version in printed and '"dice"' in printed


def test_presets_and_command_line_overrides():
    thesis = preset("thesis")
    assert (thesis.optimizer, thesis.lr, thesis.weight_decay, thesis.dropout, thesis.batch_size) == ("adam", 1e-4, 1e-5, 0.3, 4)
    assert (thesis.schedule, thesis.size, thesis.filters) == ("plateau", 512, (32, 64, 128, 256, 512))
    assert (thesis.dice_weight, thesis.focal_weight, thesis.focal_gamma) == (1.0, 1.0, 2.0) and thesis.early_stop > 0
    strong = preset("strong")
    assert (strong.optimizer, strong.lr, strong.batch_size, strong.schedule) == ("adamw", 1e-3, 16, "warmup-cosine")
    assert strong.focal_gamma == 0.0 and strong.focal_weight > strong.dice_weight  # BCE-heavier
    cfg, evaluate_path, resume_path = parse_args(["--config", "strong", "--lr", "5e-4", "--half", "--filters", "8,16"])
    assert (cfg.config, cfg.lr, cfg.half, cfg.filters, cfg.batch_size) == ("strong", 5e-4, True, (8, 16), 16)
    assert evaluate_path is None and resume_path is None
    assert parse_args([])[0] == preset("strong")  # the default since it beat thesis on grouped validation
    assert parse_args(["--config", "thesis"])[0] == preset("thesis") == TrainConfig(config="thesis")
    assert set(PRESETS) == {"thesis", "strong", "demo"}
    with pytest.raises(ValueError, match="unknown config"):
        preset("best")


def test_batch_augmentation_moves_image_and_mask_together_and_keeps_padding_black():
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 1, 64, 64)
    masks[:, :, 20:40, 10:30] = 1
    inside = torch.zeros(6, 1, 64, 64)
    inside[:, :, 8:56, :] = 1  # a wide image: padding above and below
    images = (0.3 + 0.6 * masks) * inside
    aug = AugmentConfig(rotation=20, zoom=0.15, brightness=0.1, contrast=0.1)
    out_images, out_masks = augment_batch(images, masks, inside, aug, gen)
    assert out_images.shape == images.shape and out_images.dtype == torch.float32
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert out_images.min() >= 0 and out_images.max() <= 1
    for image, mask in zip(out_images, out_masks):  # brightness differs per image: threshold each alone
        bright = image > image[image > 0].mean()
        assert (bright == (mask > 0)).float().mean() > 0.97
    assert not torch.equal(out_masks, masks)  # it moved
    again = augment_batch(images, masks, inside, aug, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out_images) and torch.equal(again[1], out_masks)
    # padding stays exactly 0 where no image pixel lands
    grid = torch.nn.functional.affine_grid(affine_params(6, aug, torch.Generator().manual_seed(0)).float(),
                                           [6, 1, 64, 64], align_corners=False)
    no_image = torch.nn.functional.grid_sample(inside, grid, mode="nearest", align_corners=False) == 0
    assert (out_images[no_image] == 0).all()


def test_deep_supervision_adds_heads_without_changing_the_network():
    network = AttentionUNet(UNetConfig(filters=(4, 8, 16, 32), dropout=0.0))
    keys = set(network.state_dict())
    wrapped = DeepSupervision(network)
    logits, aux = wrapped(torch.zeros(2, 1, 32, 32))
    assert logits.shape == (2, 1, 32, 32) and [a.shape for a in aux] == [(2, 1, 32, 32)] * 2
    assert set(network.state_dict()) == keys  # what is saved is the plain network
    sum(a.sum() for a in aux).backward()
    assert all(h.weight.grad is not None for h in wrapped.heads)


def test_strong_config_with_deep_supervision_and_ema_saves_a_servable_checkpoint(tmp_path, monkeypatch):
    import training.train as train_module

    data = generate_dataset(tmp_path / "data", 12, seed=1, min_side=48, max_side=64)
    out = tmp_path / "strong.pt"
    built = []  # the losses training builds: --dice-per-image must reach them

    class Recorded(DiceFocalLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(train_module, "DiceFocalLoss", Recorded)
    # bf16 autocast on the CPU, as the shipped BTXRD checkpoint was trained (model/checkpoints/README.md)
    train(preset("strong", data=str(data), out=str(out), size=32, filters=(4, 8, 16, 32), epochs=2, batch_size=4,
                 progress=False, tensorboard=False, cpu_bf16=True, dice_per_image=True))
    assert built and all(loss.per_image for loss in built)
    loaded = load_checkpoint(out)
    cfg = loaded.info["training_config"]
    assert cfg["dice_per_image"] is True
    assert cfg["config"] == "strong" and cfg["deep_supervision"] > 0 and cfg["ema"] > 0 and cfg["tta"] is True
    assert cfg["cpu_bf16"] is True and parse_args(["--cpu-bf16"])[0].cpu_bf16 is True
    assert all(v.dtype == torch.float32 for v in loaded.network.state_dict().values() if v.is_floating_point())
    image = np.full((40, 50), 90, np.uint8)
    from model.inference import Segmenter

    assert Segmenter(loaded).predict([image])[0].mask.shape == (40, 50)


def test_time_budget_stops_training_and_resume_carries_on_exactly(tmp_path):
    data = generate_dataset(tmp_path / "data", 12, seed=2, min_side=48, max_side=64)
    common = dict(data=str(data), size=32, filters=(4, 8), epochs=3, batch_size=4, progress=False, tensorboard=False,
                  version="v")
    straight = tmp_path / "straight.pt"
    train(preset("thesis", out=str(straight), **common))
    # the same run cut short by its time budget after the first epoch, then resumed
    cut = tmp_path / "cut.pt"
    train(preset("thesis", out=str(cut), max_minutes=1e-6, **common))
    assert "time budget" in load_checkpoint(cut).metrics["stop_reason"]
    assert load_state(state_path(cut))["epoch"] == 1
    assert train_main(["--resume", str(state_path(cut)), "--max-minutes", "0"]) == 0
    a, b = load_state(state_path(straight)), load_state(state_path(cut))
    assert a["epoch"] == b["epoch"] == 3
    for name, tensor in a["network"].items():
        assert torch.equal(tensor, b["network"][name]), name
    assert [r["val_dice"] for r in a["history"]] == [r["val_dice"] for r in b["history"]]
    lines = cut.with_name("cut.metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3]
    with pytest.raises(ValueError, match="--resume takes its config"):
        parse_args(["--resume", str(state_path(cut)), "--lr", "1"])


def test_train_command_rejects_missing_data_and_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="no data"):
        train_main(["--out", str(tmp_path / "x.pt")])
    with pytest.raises(ValueError, match="not divisible"):
        train_main(["--data", str(tmp_path), "--size", "100", "--filters", "4,8,16,32"])


def test_init_from_starts_at_the_parents_weights_and_normalisation(tmp_path):
    data = generate_dataset(tmp_path / "data", 12, seed=2, min_side=48, max_side=64)
    common = dict(data=str(data), size=32, filters=(4, 8), batch_size=4, progress=False, tensorboard=False)
    parent_path = train(preset("thesis", out=str(tmp_path / "parent.pt"), epochs=2, version="parent", **common))
    parent = load_checkpoint(parent_path)
    # the child trains on part of the data (other intensity statistics) at lr ~0: its weights stay the
    # parent's, so any difference would come from the start, not from training (batch-norm running
    # statistics do move in training, so only the parameters are compared)
    child_cfg = preset("thesis", out=str(tmp_path / "child.pt"), epochs=1, lr=1e-30, min_lr=1e-30, max_train=4,
                       init_from=str(parent_path), version="child", **common)
    child = load_checkpoint(train(child_cfg))
    child_params = dict(child.network.named_parameters())
    for name, tensor in parent.network.named_parameters():
        assert torch.equal(tensor, child_params[name]), name
    own = load_checkpoint(train(dataclasses.replace(child_cfg, init_from=None, out=str(tmp_path / "own.pt"))))
    assert own.preprocessor.mean != parent.preprocessor.mean  # the subset alone would give other statistics
    assert (child.preprocessor.mean, child.preprocessor.std) == (parent.preprocessor.mean, parent.preprocessor.std)
    assert child.info["init_from"]["version"] == "parent" and child.version == "child"
    assert child.info["init_from"]["history"] == parent.info["history"]
    assert own.info["init_from"] is None
    own_params = dict(own.network.named_parameters())
    assert not all(torch.equal(t, own_params[name]) for name, t in parent.network.named_parameters())
    # resumed after the parent file is gone: the normalisation and the lineage come from the training state
    cut = tmp_path / "cut.pt"
    train(dataclasses.replace(child_cfg, out=str(cut), epochs=2, max_minutes=1e-6, version="cut"))
    parent_path.unlink()
    assert train_main(["--resume", str(state_path(cut)), "--max-minutes", "0"]) == 0
    resumed = load_checkpoint(cut)
    assert resumed.preprocessor.mean == parent.preprocessor.mean
    assert resumed.info["init_from"]["version"] == "parent"
    with pytest.raises(ValueError, match="differs from this run's"):
        train(dataclasses.replace(child_cfg, out=str(tmp_path / "wide.pt"), filters=(4, 8, 16), init_from=str(cut)))
    # the same network at another frame size (a fine-tune at a new scale): the weights carry over, the size is recorded
    larger = load_checkpoint(train(dataclasses.replace(child_cfg, out=str(tmp_path / "larger.pt"), size=48,
                                                       init_from=str(cut))))
    assert larger.preprocessor.size == 48 and larger.info["init_from"]["size"] == 32
    larger_params = dict(larger.network.named_parameters())
    for name, tensor in resumed.network.named_parameters():
        assert torch.equal(tensor, larger_params[name]), name


def test_cpu_bf16_is_called_native_only_with_the_instructions_for_it():
    from model.inference import cpu_has_native_bf16

    assert cpu_has_native_bf16("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 vaes\n") is True
    assert cpu_has_native_bf16("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n") is True
    assert cpu_has_native_bf16("flags\t\t: fpu sse2 avx2 avx512f vaes\n") is False  # AVX-512 alone emulates bf16
    assert cpu_has_native_bf16("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n") is None  # ARM: no verdict
