"""Train the attention U-Net on images in BTXRD's layout.

Named recipes (``--config``; any flag given on the command line overrides it):

- ``thesis``: the thesis's recipe. Dice + Focal
  (gamma 2), Adam at 1e-4 with weight decay 1e-5, dropout 0.3, batch 4,
  ReduceLROnPlateau (x0.5 after 5 epochs without a better validation Dice)
  and early stopping (15 epochs) on validation Dice, augmentation of image
  and mask together (flips, rotation, zoom, brightness/contrast:
  ``training.augment``), z-score from the training split, the full network
  ``UNetConfig()`` at 512 x 512.
- ``strong``: our design. AdamW at 1e-3 (weight decay 1e-4), linear warmup
  then cosine decay (by epochs or by the ``--max-minutes`` budget, whichever
  runs out first), batch 16, a BCE-heavier loss (0.5 soft Dice + 1.0 BCE),
  dropout 0.1, output bias started at tumor probability 0.01, deep
  supervision on the two coarser decoder levels (training only; the served
  network is unchanged), an exponential moving average of the weights, and
  flip test-time augmentation suggested at evaluation. The default
  (``DEFAULT_CONFIG``): at an equal budget on one H100 it beat ``thesis`` on
  the grouped validation split, 0.499 against 0.416 (docs/training.md 5c).
- ``demo``: the recipe of the synthetic demo checkpoint (Adam 1e-3 with cosine
  decay to lr / 20, batch 8, a two-way 80/20 split, the older numpy
  augmentation); with the flags in model/checkpoints/README.md it reproduces
  ``synthetic-demo.pt``.

Commands::

    # real BTXRD-256 on a GPU, the grouped split (its CC BY-NC-ND 4.0 terms carry over to the checkpoint)
    python -m training.train --config thesis --data ../shared/data/btxrd-256 \\
        --split-file training/splits/btxrd-256-grouped-v1.csv --out runs/btxrd-thesis.pt
    python -m training.train --config strong --data ../shared/data/btxrd-256 \\
        --split-file training/splits/btxrd-256-grouped-v1.csv --out runs/btxrd-strong.pt --max-minutes 30
    # carry on after an interruption (every epoch writes <out stem>.last.pt)
    python -m training.train --resume runs/btxrd-strong.last.pt
    # the synthetic demo checkpoint
    python -m training.train --config demo --synthetic 400 --synthetic-seed 0 \\
        --test-synthetic 200 --test-seed 1 \\
        --out model/checkpoints/synthetic-demo.pt --metrics-file runs/synthetic-demo.metrics.jsonl \\
        --size 192 --filters 8,16,32,64,128 --dropout 0 --epochs 30 --batch-size 8 --lr 2e-3 --seed 0 \\
        --label "synthetic, not for clinical use"

What it does: read the folder with ``training.btxrd``; split it (a split
file from ``training.split``, or the same split computed on the fly; the
test part is never looked at); put every image through ``to_unit_float`` and
``Preprocessor(size)`` (the serving code path) and its mask through
``Preprocessor.resize_mask``; measure the z-score mean/std on the training
split; train (bf16 autocast on CUDA, channels_last); after every epoch score
the validation split with ``model.metrics``, append a line to the metrics
file (JSONL; TensorBoard too when installed), save ``<out stem>.last.pt``
(weights, optimizer, scheduler, epoch, RNG states: ``--resume``); keep the
best epoch; choose the decision threshold on validation; score validation
at the original resolution through ``model.inference.Segmenter``; save with
``model.checkpoint.save_checkpoint`` including the resolved config, the
split used and the ids of the training images.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bonedetect import allocator
from model.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from model.inference import Segmenter, bf16_autocast, cpu_has_native_bf16
from model.metrics import MetricAccumulator
from model.network import AttentionUNet, UNetConfig
from model.postprocess import Postprocessor
from model.preprocess import Preprocessor, to_unit_float
from training.augment import AugmentConfig, augment_batch
from training.btxrd import BtxrdRecord, load_image, load_mask, read_btxrd
from training.losses import DiceFocalLoss
from training.split import SPLITS, THESIS_FRACTIONS, assign, csv_text, read_split_csv, split_rows, stratified_split
from training.synthetic import generate_dataset, is_synthetic
from training.thresholds import choose_threshold, with_threshold

TRAIN_TTA_MODES = ("flip", "flip4")  # with cfg.tta, a threshold of its own is chosen for each (training.thresholds)
SYNTHETIC_LICENSE = "synthetic images from training.synthetic; no real patient data"
BTXRD_LICENSE = ("trained on BTXRD (Yao et al., Scientific Data 12:88, 2025), which is CC BY-NC-ND 4.0: this "
                 "checkpoint inherits its terms; non-commercial use only")
OTHER_LICENSE = ("the terms of the training data apply; BTXRD (the reference data) is CC BY-NC-ND 4.0, "
                 "so a model trained on it is for non-commercial use only")
BTXRD_LABEL = "BTXRD-trained: non-commercial research only (CC BY-NC-ND 4.0), not for clinical use"

THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(9))  # 0.30 .. 0.70 (the demo's grid)
WIDE_THRESHOLDS = tuple(round(0.10 + 0.05 * i, 2) for i in range(17))  # 0.10 .. 0.90
STATE_FORMAT = "bonedetect-train-state/1"
SAVE_EVERY_S = 60.0  # the resumable state is written at most this often, and when training stops
# What --resume takes from the command line; everything else comes from the saved state.
RESUME_OVERRIDES = ("epochs", "max_minutes", "device", "out", "metrics_file", "label", "version", "half",
                    "tensorboard", "progress")


@dataclass
class TrainConfig:
    """The defaults are the thesis recipe (``--config thesis``); ``PRESETS`` holds the others."""

    config: str = "thesis"  # the named recipe these values started from (recorded, not used)
    # data: a folder in BTXRD's layout, or synthetic images generated first
    data: str | None = None
    synthetic: int = 0  # > 0: generate this many synthetic images (instead of --data)
    synthetic_seed: int = 0
    work: str | None = None  # where synthetic images go; a temporary folder when None
    test: str | None = None  # optional held-out folder, scored once after training
    test_synthetic: int = 0  # > 0: generate a held-out synthetic test set of this size
    test_seed: int = 1  # its seed; must differ from synthetic_seed to be held out
    # split: a file (training.split) wins; else computed: "grouped" | "thesis" (72/18/10) | "stratified" (2-way)
    split_file: str | None = None
    split: str = "grouped"
    split_seed: int = 0
    val_fraction: float = 0.2  # only for split "stratified"
    max_train: int = 0  # > 0: a seeded subset of the training split (smoke runs)
    max_val: int = 0  # > 0: likewise for validation
    # network and preprocessing
    size: int = 512  # frame side; a multiple of 2 ** (len(filters) - 1)
    filters: tuple[int, ...] = (32, 64, 128, 256, 512)  # the thesis network
    dropout: float = 0.3
    output_prior: float = 0.0  # > 0: initial tumor probability everywhere (output bias, Lin et al. 2017); 0: keep the init
    init_from: str | None = None  # a checkpoint of the same network: start from its weights and its z-score (a warm restart)
    # optimisation
    optimizer: str = "adam"  # "adam" | "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    batch_size: int = 4
    epochs: int = 100
    max_minutes: float = 0.0  # > 0: stop training after this much wall time (warmup-cosine anneals by it too)
    schedule: str = "plateau"  # "plateau" (on val Dice) | "warmup-cosine" | "cosine" (the demo's: to lr / 20, no warmup)
    plateau_factor: float = 0.5
    plateau_patience: int = 5  # epochs without a better val Dice before the lr is cut
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0
    early_stop: int = 15  # stop after this many epochs without a better val Dice; 0: never
    # loss: dice_weight * soft Dice + focal_weight * focal (focal_gamma 0 is plain BCE)
    dice_weight: float = 1.0
    focal_weight: float = 1.0
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    dice_per_image: bool = False  # the Dice term per image, averaged, instead of pooled over the batch (training.losses)
    deep_supervision: float = 0.0  # > 0: auxiliary losses on the two coarser decoder levels, weights w and w / 2
    ema: float = 0.0  # > 0: keep (and validate, and ship) an exponential moving average of the weights, this decay per step
    # augmentation: "batch" (training.augment) | "legacy" (the demo's numpy flips/rotation/gain/gamma) | "none"
    augment: str = "batch"
    hflip: float = 0.5
    vflip: float = 0.5
    max_rotation: float = 15.0  # degrees
    zoom: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1
    # evaluation
    thresholds: tuple[float, ...] = WIDE_THRESHOLDS  # candidates, chosen on validation
    tta: bool = False  # also choose a threshold per TTA mode (flip, flip4) on validation, stored for INFER_TTA workers
    # machinery
    seed: int = 0
    device: str | None = None  # None: cuda if available, else cpu
    compile: bool = False  # torch.compile the network (CUDA; the first epoch pays for compiling)
    cpu_bf16: bool = False  # bf16 autocast for training steps on CPU too (CPUs with AVX512-BF16 or AMX); validation stays fp32
    progress: bool = True  # a progress bar per epoch (tqdm, when installed and on a terminal)
    tensorboard: bool | None = None  # None: when torch.utils.tensorboard imports
    # output
    out: str = "runs/model.pt"
    metrics_file: str | None = None  # None: next to --out, <stem>.metrics.jsonl
    label: str | None = None  # None: derived from the data
    version: str | None = None  # None: "<out stem>-<YYYYMMDD>-<weights hash>"
    half: bool = False  # store weights as fp16


PRESETS: dict[str, dict] = {
    "thesis": {},
    "strong": dict(
        optimizer="adamw", lr=1e-3, weight_decay=1e-4, batch_size=16, schedule="warmup-cosine", warmup_epochs=3,
        min_lr=1e-5, epochs=150, early_stop=30, dropout=0.1, dice_weight=0.5, focal_weight=1.0, focal_gamma=0.0,
        output_prior=0.01, deep_supervision=0.3, ema=0.995, tta=True,
    ),
    "demo": dict(
        size=256, split="stratified", val_fraction=0.2, lr=1e-3, weight_decay=0.0, batch_size=8, epochs=50,
        schedule="cosine", early_stop=0, output_prior=0.01, augment="legacy", max_rotation=10.0, thresholds=THRESHOLDS,
    ),
}


# The recipe a bare `python -m training.train` uses: strong, since it beat the thesis recipe on the grouped
# validation split at an equal budget (one H100, 2026-11-27: pooled Dice 0.499 vs 0.416; docs/training.md 5c).
DEFAULT_CONFIG = "strong"


def preset(name: str, **overrides) -> TrainConfig:
    """``TrainConfig`` of the named recipe with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], **overrides, "config": name})


def check_config(cfg: TrainConfig) -> UNetConfig:
    """Raise ValueError for settings that cannot work; returns the network config."""
    net = UNetConfig(filters=tuple(cfg.filters), dropout=cfg.dropout)
    if cfg.size % net.multiple:
        raise ValueError(f"--size {cfg.size} is not divisible by {net.multiple} (needed by {len(cfg.filters)} levels)")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"--epochs and --batch-size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    choices = {"optimizer": ("adam", "adamw"), "schedule": ("plateau", "warmup-cosine", "cosine"),
               "augment": ("batch", "legacy", "none"), "split": ("grouped", "thesis", "stratified")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(cfg, name)!r}")
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(f"--ema must be in [0, 1), got {cfg.ema}")
    if cfg.deep_supervision < 0:
        raise ValueError(f"--deep-supervision must be >= 0, got {cfg.deep_supervision}")
    if cfg.deep_supervision and len(cfg.filters) < 4:
        raise ValueError("--deep-supervision needs at least 4 levels (--filters with 4 or more widths)")
    if not cfg.thresholds or not all(0.0 < t < 1.0 for t in cfg.thresholds):
        raise ValueError(f"--thresholds must be values in (0, 1), got {cfg.thresholds}")
    if cfg.augment == "batch":
        _augment_config(cfg)  # validates the ranges
    return net


def _augment_config(cfg: TrainConfig) -> AugmentConfig:
    return AugmentConfig(hflip=cfg.hflip, vflip=cfg.vflip, rotation=cfg.max_rotation, zoom=cfg.zoom,
                         brightness=cfg.brightness, contrast=cfg.contrast)


# ---------------------------------------------------------------- data


@dataclass
class Frames:
    """Images in the network's frame, before z-scoring."""

    records: list[BtxrdRecord]
    images: np.ndarray  # (N, S, S) float32 in [0, 1], zero padding
    masks: np.ndarray  # (N, S, S) uint8 {0, 1}
    inside: np.ndarray  # (N, S, S) bool, True on image pixels (not padding)


def prepare_frames(records: list[BtxrdRecord], size: int) -> Frames:
    """Load, ``to_unit_float`` and place every image with ``Preprocessor(size)``."""
    pre = Preprocessor(size)  # mean 0, std 1: unit values
    n = len(records)
    images = np.zeros((n, size, size), np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    inside = np.zeros((n, size, size), bool)
    for i, record in enumerate(records):
        pixels = load_image(record)
        images[i], g = pre(to_unit_float(pixels))
        masks[i] = pre.resize_mask(load_mask(record, pixels.shape), g)
        inside[i, g.top : g.top + g.scaled_h, g.left : g.left + g.scaled_w] = True
    return Frames(records, images, masks, inside)


def intensity_stats(frames: Frames) -> tuple[float, float]:
    """Mean and std of the unit-float image pixels (padding excluded)."""
    values = frames.images[frames.inside].astype(np.float64)
    return float(values.mean()), float(max(values.std(), 1e-6))


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, max_rotation: float):
    """The demo's augmentation (``--augment legacy``): the same random flip and
    rotation on both; gain and gamma on the image only.

    ``image`` is a unit-float frame with black padding: rotation fills with 0
    and gain/gamma keep 0 at 0, so padding stays what serving produces.
    """
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1, :], mask[::-1, :]
    angle = rng.uniform(-max_rotation, max_rotation) if max_rotation > 0 else 0.0
    if angle:
        s = image.shape[0]
        m = cv2.getRotationMatrix2D((s / 2 - 0.5, s / 2 - 0.5), angle, 1.0)
        image = cv2.warpAffine(np.ascontiguousarray(image), m, (s, s), flags=cv2.INTER_LINEAR, borderValue=0)
        mask = cv2.warpAffine(np.ascontiguousarray(mask), m, (s, s), flags=cv2.INTER_NEAREST, borderValue=0)
    gain, gamma = rng.uniform(0.85, 1.15), math.exp(rng.uniform(-0.25, 0.25))
    image = np.clip(gain * np.power(np.clip(image, 0, 1), gamma), 0.0, 1.0)
    return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(mask)


@dataclass
class SplitChoice:
    train: list[BtxrdRecord]
    val: list[BtxrdRecord]
    n_test: int  # images of the test part (never used here)
    info: dict  # kind, file, sha256, description
    problems: list[tuple[str, str]]


def choose_split(cfg: TrainConfig, records: list[BtxrdRecord]) -> SplitChoice:
    """The training and validation records (module docstring)."""
    if cfg.split_file:
        sf = read_split_csv(cfg.split_file)
        parts, problems = assign(records, sf)
        info = {"kind": "file", "file": sf.name, "sha256": sf.sha256, "description": sf.describe()}
        return SplitChoice(parts["train"], parts["val"], len(parts["test"]), info, problems)
    if cfg.split == "stratified":
        train_idx, val_idx = stratified_split([r.stratum for r in records], cfg.val_fraction, cfg.split_seed)
        info = {"kind": "stratified", "file": None, "sha256": None,
                "description": f"stratified {1 - cfg.val_fraction:.0%}/{cfg.val_fraction:.0%}, seed {cfg.split_seed}"}
        return SplitChoice([records[i] for i in train_idx], [records[i] for i in val_idx], 0, info, [])
    rows = split_rows(records, cfg.split, THESIS_FRACTIONS, cfg.split_seed)
    by_id = {r.image_id: r for r in records}
    parts = {name: [by_id[row["image_id"]] for row in rows if row["split"] == name] for name in SPLITS}
    sha = hashlib.sha256(csv_text(rows).encode()).hexdigest()  # as the file training.split would write
    info = {"kind": cfg.split, "file": None, "sha256": sha,
            "description": f"{cfg.split} 72/18/10, seed {cfg.split_seed}, computed on the fly "
                           f"(python -m training.split writes it to a file)"}
    return SplitChoice(parts["train"], parts["val"], len(parts["test"]), info, [])


def _subset(records: list, n: int, seed: int) -> list:
    if not n or len(records) <= n:
        return records
    rng = np.random.default_rng([seed, 7])
    return [records[i] for i in sorted(rng.choice(len(records), n, replace=False))]


# ---------------------------------------------------------------- network pieces


class DeepSupervision(nn.Module):
    """Auxiliary 1x1 heads on the two coarser decoder levels below the last one
    (1/2 and 1/4 of the input size), read through forward hooks, so the
    network itself is unchanged and is what gets saved. Training only.

    ``forward(x)`` -> (logits, [aux logits up-sampled to the input size]).
    """

    def __init__(self, network: AttentionUNet, levels: int = 2):
        super().__init__()
        self.network = network
        widths = list(network.config.filters[:-1])[::-1]  # decoder widths, deepest first
        self.taps = list(range(len(widths) - 1 - levels, len(widths) - 1))  # e.g. [1, 2] of 4 levels
        self.heads = nn.ModuleList(nn.Conv2d(widths[i], 1, 1) for i in self.taps)
        self._features: dict[int, torch.Tensor] = {}
        for i in self.taps:
            network.decoder[i].register_forward_hook(self._keep(i))

    def _keep(self, i: int):
        def hook(_module, _inputs, output):
            self._features[i] = output

        return hook

    def forward(self, x):
        self._features.clear()
        logits = self.network(x)
        aux = [F.interpolate(head(self._features[i]), size=logits.shape[-2:], mode="bilinear", align_corners=False)
               for head, i in zip(self.heads, self.taps)]
        return logits, aux


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _batch(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, S, S) numpy -> (n, 1, S, S) channels_last tensor on device."""
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))[:, None].to(device)
    return t.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_frames(network, images_z: np.ndarray, device: torch.device, batch_size: int = 16) -> np.ndarray:
    """(N, S, S) z-scored frames -> (N, S, S) float32 probabilities."""
    network.eval()
    out = []
    for start in range(0, len(images_z), batch_size):
        with bf16_autocast(device):
            logits = network(_batch(images_z[start : start + batch_size], device))
        out.append(torch.sigmoid(logits.float())[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + images_z.shape[1:], np.float32)


def frame_scores(probs: np.ndarray, masks: np.ndarray, threshold: float) -> dict:
    acc = MetricAccumulator()
    acc.update_batch(probs > threshold, masks)
    return acc.summary()


def evaluate(loaded: LoadedModel, records: list[BtxrdRecord], device: str | None = None, batch_size: int = 16,
             flip_tta: bool | str = False) -> dict:
    """Scores at the original resolution through ``Segmenter`` (the serving
    path, postprocessing included, TTA mode ``flip_tta``): pooled and per-image (module
    ``model.metrics``), normal images counted (an empty prediction on a normal
    image scores 1), plus the share of normal images given any tumor pixel."""
    segmenter = Segmenter(loaded, device=device, batch_size=batch_size, flip_tta=flip_tta)
    acc = MetricAccumulator()
    normal_fp = n_normal = 0
    for start in range(0, len(records), 64):
        chunk = records[start : start + 64]
        images = [load_image(r) for r in chunk]
        for record, image, pred in zip(chunk, images, segmenter.predict(images)):
            acc.update(pred.mask, load_mask(record, image.shape))
            if not record.tumor:
                n_normal += 1
                normal_fp += int(pred.mask.any())
    out = acc.summary()
    out["n_normal"] = n_normal
    out["normal_with_false_tumor"] = normal_fp
    return out


def set_output_prior(network: AttentionUNet, prior: float) -> None:
    """Start every pixel at tumor probability ``prior``: the bias of the last
    1x1 conv is set to logit(prior). Tumors cover about 1% of a radiograph;
    starting at 0.5 makes the first epochs spend themselves on pushing the
    background down, which focal loss (small gradients on easy pixels) does
    slowly (Lin et al. 2017, section 4.1, "Initialization")."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"output prior must be in (0, 1), got {prior}")
    head = getattr(network, "head", None)
    if not isinstance(head, torch.nn.Conv2d) or head.bias is None:
        raise ValueError("the network has no final conv with a bias ('head') to set a prior on")
    with torch.no_grad():
        head.bias.fill_(math.log(prior / (1.0 - prior)))


def _lr_at(step: int, total: int, lr: float) -> float:
    """The demo's schedule: cosine from lr to lr / 20 over ``total`` steps."""
    floor = lr / 20
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def warmup_cosine(step: int, warmup_steps: int, progress: float, lr: float, min_lr: float) -> float:
    """Linear warmup over the first ``warmup_steps`` steps, then cosine from lr
    to min_lr as ``progress`` (0..1: the larger of the share of steps and the
    share of the time budget spent) goes to 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def _weights_hash(network) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:8]


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- data sources


def _resolve_data(cfg: TrainConfig, stack: contextlib.ExitStack) -> tuple[Path, str]:
    """-> (folder in BTXRD's layout, description). Generates synthetic data if asked."""
    if cfg.synthetic > 0:
        if cfg.data:
            raise ValueError("give either --data or --synthetic, not both")
        work = Path(cfg.work) if cfg.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bonedetect-synth-")))
        folder = work / f"synthetic-n{cfg.synthetic}-seed{cfg.synthetic_seed}"
        t0 = time.perf_counter()
        generate_dataset(folder, cfg.synthetic, seed=cfg.synthetic_seed)
        print(f"generated {cfg.synthetic} synthetic images (seed {cfg.synthetic_seed}) in {folder} "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)
        return folder, f"synthetic: training.synthetic.generate_dataset(n={cfg.synthetic}, seed={cfg.synthetic_seed})"
    if not cfg.data:
        raise ValueError("no data: give --data DIR or --synthetic N")
    return Path(cfg.data), str(cfg.data)


def _resolve_test(cfg: TrainConfig, stack: contextlib.ExitStack) -> tuple[Path | None, str | None]:
    if cfg.test_synthetic > 0:
        if cfg.synthetic > 0 and cfg.test_seed == cfg.synthetic_seed:
            raise ValueError(f"--test-seed must differ from --synthetic-seed ({cfg.synthetic_seed}) to be held out")
        work = Path(cfg.work) if cfg.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bonedetect-test-")))
        folder = generate_dataset(work / f"synthetic-n{cfg.test_synthetic}-seed{cfg.test_seed}", cfg.test_synthetic, seed=cfg.test_seed)
        return folder, f"synthetic: training.synthetic.generate_dataset(n={cfg.test_synthetic}, seed={cfg.test_seed})"
    if cfg.test:
        return Path(cfg.test), str(cfg.test)
    return None, None


def _data_terms(root: Path, synthetic: bool) -> tuple[str, str]:
    """(data_license, default label) for a training folder."""
    if synthetic:
        return SYNTHETIC_LICENSE, "synthetic, not for clinical use"
    try:
        readme = (root / "README.md").read_text(errors="replace")
    except OSError:
        readme = ""
    if "BTXRD" in readme or "btxrd" in root.name.lower():
        return BTXRD_LICENSE, BTXRD_LABEL
    return OTHER_LICENSE, "research only, not for clinical use"


# ---------------------------------------------------------------- progress and logs


class _Progress:
    """tqdm over the steps of an epoch when tqdm is installed and stderr is a terminal; else nothing
    (the trainer prints one plain line per epoch either way)."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tensorboard(cfg: TrainConfig, log_dir: Path):
    if cfg.tensorboard is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if cfg.tensorboard:
            raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        return None
    return SummaryWriter(log_dir=str(log_dir))


# ---------------------------------------------------------------- training state (resume)


def _rng_state(rng: np.random.Generator, aug_gen: torch.Generator) -> dict:
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, rng: np.random.Generator, aug_gen: torch.Generator) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    aug_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, payload: dict) -> None:
    """Atomic ``torch.save`` (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict:
    """Read a ``<out stem>.last.pt`` training state.

    Raises:
        ValueError: when the file is not a training state of this format.
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a training state ({STATE_FORMAT}); --resume takes the <out stem>.last.pt file")
    return data


def state_path(out: Path) -> Path:
    return out.with_name(out.stem + ".last.pt")


# ---------------------------------------------------------------- the run


def train(cfg: TrainConfig, command: str | None = None, resume: dict | None = None) -> Path:
    """Run one training (module docstring) and return the checkpoint path.

    ``command``: the command line, recorded in the checkpoint. ``resume``: a
    state from ``load_state``; training goes on from its epoch with its
    config (``cfg`` should be that config, with RESUME_OVERRIDES applied).
    """
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    aug_gen = torch.Generator().manual_seed(cfg.seed)
    device = _device(cfg.device)
    net_config = check_config(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.cpu_bf16 and device.type == "cpu" and cpu_has_native_bf16() is False:
        print("warning: --cpu-bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 flag): autocast emulates "
              "it and trains slower than fp32; leave the flag off here", file=sys.stderr, flush=True)
    # --init-from: checked before any data is read. A resumed run takes the z-score and lineage from its state
    # instead, so a parent file moved or replaced since cannot change them.
    parent = load_checkpoint(cfg.init_from) if cfg.init_from and resume is None else None
    if parent is not None:
        same_shape = dataclasses.replace(parent.network.config, dropout=net_config.dropout) == net_config
        if not same_shape:  # the frame size may differ (convolutions do not care): a fine-tune at a new scale
            raise ValueError(f"--init-from {cfg.init_from}: its network {parent.network.config} "
                             f"differs from this run's {net_config}")
        if parent.preprocessor.size != cfg.size:
            print(f"--init-from: the parent ran at {parent.preprocessor.size} px, this run at {cfg.size} px", flush=True)
    out = Path(cfg.out)
    metrics_path = Path(cfg.metrics_file) if cfg.metrics_file else out.with_name(out.stem + ".metrics.jsonl")
    last_path = state_path(out)
    legacy = cfg.augment == "legacy"

    with contextlib.ExitStack() as stack:
        root, data_desc = _resolve_data(cfg, stack)
        dataset = read_btxrd(root)
        synthetic = is_synthetic(root)
        data_license, default_label = _data_terms(root, synthetic)
        if dataset.problems:
            print(f"{len(dataset.problems)} data problems (see python -m training.btxrd {root} --problems)", flush=True)
        if len(dataset.records) < 2:
            raise ValueError(f"{root}: need at least 2 usable images, found {len(dataset.records)}")
        choice = choose_split(cfg, dataset.records)
        if choice.problems:
            print(f"{len(choice.problems)} images differ between the data and the split file "
                  f"(first: {choice.problems[0][0]}: {choice.problems[0][1]})", flush=True)
        train_records = _subset(choice.train, cfg.max_train, cfg.seed)
        val_records = _subset(choice.val, cfg.max_val, cfg.seed)
        if not train_records or not val_records:
            raise ValueError(f"the split leaves {len(train_records)} training and {len(val_records)} validation "
                             "images; both must be non-empty (add images or change the split)")
        if resume is not None:
            saved_ids = resume["data"]["train_ids"]
            if [r.image_id for r in train_records] != saved_ids:
                raise ValueError("--resume: the data or split differ from the interrupted run's (training images changed)")
        t0 = time.perf_counter()
        train_set = prepare_frames(train_records, cfg.size)
        val_set = prepare_frames(val_records, cfg.size)
        mean, std = intensity_stats(train_set)
        # the parent's weights expect the parent's normalisation
        init_record = resume.get("init_from") if resume is not None else None
        if parent is not None:
            mean, std = parent.preprocessor.mean, parent.preprocessor.std
            init_record = {"path": cfg.init_from, "version": parent.version, "size": parent.preprocessor.size,
                           "history": parent.info.get("history"),
                           "init_from": parent.info.get("init_from")}  # the parent's own parent, and so on
        if resume is not None and resume.get("zscore") is not None:
            mean, std = resume["zscore"]
        print(f"data: {len(train_records)} train, {len(val_records)} val ({choice.info['description']}), "
              f"mean {mean:.4f} std {std:.4f} [{time.perf_counter() - t0:.0f}s]", flush=True)
        val_z = (val_set.images - mean) / std

        network = AttentionUNet(net_config)
        if parent is not None:
            network.load_state_dict(parent.network.state_dict())
            print(f"starting from {cfg.init_from} (version {parent.version})", flush=True)
        elif cfg.output_prior:
            set_output_prior(network, cfg.output_prior)
        network = network.to(device).to(memory_format=torch.channels_last)
        # the average is taken before DeepSupervision hooks the network, so the copy carries no hooks
        ema = (torch.optim.swa_utils.AveragedModel(network, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),
                                                   use_buffers=True) if cfg.ema else None)
        supervised = DeepSupervision(network).to(device) if cfg.deep_supervision else None
        trainable = supervised if supervised is not None else network
        params = list(trainable.parameters())
        if cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.plateau_factor,
                                                              patience=cfg.plateau_patience, min_lr=cfg.min_lr)
                   if cfg.schedule == "plateau" else None)
        forward = torch.compile(trainable) if cfg.compile else trainable
        loss_fn = DiceFocalLoss(cfg.dice_weight, cfg.focal_weight, cfg.focal_gamma, cfg.focal_alpha,
                                per_image=cfg.dice_per_image)
        steps_per_epoch = math.ceil(len(train_records) / cfg.batch_size)
        total_steps = cfg.epochs * steps_per_epoch
        budget_s = cfg.max_minutes * 60.0

        history: list[dict] = []
        best = {"dice": -1.0, "epoch": 0, "state": None}
        step, start_epoch, elapsed, since_best = 0, 0, 0.0, 0
        if resume is not None:
            network.load_state_dict(resume["network"])
            if supervised is not None and resume.get("heads") is not None:
                supervised.heads.load_state_dict(resume["heads"])
            if ema is not None and resume.get("ema") is not None:
                ema.load_state_dict(resume["ema"])
            optimizer.load_state_dict(resume["optimizer"])
            if plateau is not None and resume.get("plateau") is not None:
                plateau.load_state_dict(resume["plateau"])
            step, start_epoch, elapsed = resume["step"], resume["epoch"], resume["elapsed"]
            since_best, history, best = resume["since_best"], resume["history"], resume["best"]
            _set_rng_state(resume["rng"], rng, aug_gen)
            print(f"resuming after epoch {start_epoch} ({elapsed / 60:.1f} min trained, best val dice "
                  f"{best['dice']:.4f} at epoch {best['epoch']})", flush=True)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        # from the saved history: epochs after the last saved state are trained again, not listed twice
        metrics_path.write_text("".join(json.dumps(row) + "\n" for row in history))
        writer = _tensorboard(cfg, out.with_name(out.stem + ".tb"))
        if writer is not None:
            stack.callback(writer.close)

        if not legacy:
            train_x = torch.from_numpy(train_set.images)[:, None].to(device)  # (N, 1, S, S) unit float
            train_y = torch.from_numpy(train_set.masks)[:, None].to(device)
            train_in = torch.from_numpy(train_set.inside)[:, None].to(device)
        aug_cfg = _augment_config(cfg) if cfg.augment == "batch" else None

        def current_lr() -> float:
            if cfg.schedule == "cosine":
                return _lr_at(step, total_steps, cfg.lr)
            if cfg.schedule == "warmup-cosine":
                progress = step / max(total_steps, 1)
                if budget_s:
                    progress = max(progress, (elapsed + time.perf_counter() - t_run) / budget_s)
                return warmup_cosine(step, round(cfg.warmup_epochs * steps_per_epoch), progress, cfg.lr, cfg.min_lr)
            return optimizer.param_groups[0]["lr"]

        stop_reason = "epochs"
        t_run = last_save = time.perf_counter()
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            trainable.train()
            order = rng.permutation(len(train_records))
            losses = []
            bar = _Progress(cfg.progress, steps_per_epoch, f"epoch {epoch}/{cfg.epochs}")
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                if legacy:
                    pairs = [augment(train_set.images[i], train_set.masks[i], rng, cfg.max_rotation) for i in batch]
                    x = _batch((np.stack([p[0] for p in pairs]) - mean) / std, device)
                    y = _batch(np.stack([p[1] for p in pairs]), device)
                else:
                    idx = torch.from_numpy(batch).to(device)
                    xb, yb = train_x[idx], train_y[idx].float()
                    if aug_cfg is not None:
                        xb, yb = augment_batch(xb, yb, train_in[idx], aug_cfg, aug_gen)
                    x = ((xb - mean) / std).contiguous(memory_format=torch.channels_last)
                    y = yb.contiguous(memory_format=torch.channels_last)
                if cfg.schedule != "plateau":
                    for group in optimizer.param_groups:
                        group["lr"] = current_lr()
                with bf16_autocast(device, cfg.cpu_bf16):
                    output = forward(x)
                if supervised is not None:
                    logits, aux = output
                    loss = loss_fn(logits.float(), y)
                    for k, a in enumerate(reversed(aux)):  # finest auxiliary first: weights w, w / 2
                        loss = loss + cfg.deep_supervision / (2**k) * loss_fn(a.float(), y)
                else:
                    loss = loss_fn(output.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(network)
                losses.append(loss.item())
                bar.update(losses[-1])
                step += 1
            bar.close()
            judged = ema.module if ema is not None else network
            probs = predict_frames(judged, val_z, device, batch_size=32 if device.type == "cuda" else 16)
            with torch.no_grad():
                p_val = torch.from_numpy(probs).to(device).clamp(1e-6, 1 - 1e-6)[:, None]
                val_loss = float(loss_fn(torch.logit(p_val), torch.from_numpy(val_set.masks).to(device)[:, None].float()))
            scores = frame_scores(probs, val_set.masks, 0.5)
            if plateau is not None:
                plateau.step(scores["dice"])
            improved = scores["dice"] > best["dice"]
            if improved:
                best = {"dice": scores["dice"], "epoch": epoch, "state": _cpu_state(judged) if not legacy
                        else copy.deepcopy(judged.state_dict())}
                since_best = 0
            else:
                since_best += 1
            last_epoch_s = time.perf_counter() - t_epoch
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, "val_loss": val_loss,
                   "val_dice": scores["dice"], "val_iou": scores["iou"],
                   "val_mean_dice_positive": scores["mean_dice_positive"],
                   "lr": current_lr() if cfg.schedule != "plateau" else optimizer.param_groups[0]["lr"],
                   "seconds": round(last_epoch_s, 2),
                   "minutes_total": round((elapsed + time.perf_counter() - t_run) / 60, 3)}
            history.append(row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if writer is not None:
                for key in ("train_loss", "val_loss", "val_dice", "val_iou", "lr"):
                    if row[key] is not None:
                        writer.add_scalar(key, row[key], epoch)
            print(f"epoch {epoch:3d}/{cfg.epochs}  loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
                  f"val dice {scores['dice']:.4f}{' *' if improved else '  '}  lr {row['lr']:.2e}  "
                  f"{row['seconds']:.1f}s", flush=True)
            stop = None
            if cfg.early_stop and since_best >= cfg.early_stop:
                stop = f"early stop ({cfg.early_stop} epochs without a better val dice)"
            elif epoch == cfg.epochs:
                stop = "epochs"
            elif budget_s and elapsed + time.perf_counter() - t_run + last_epoch_s > budget_s:
                stop = f"time budget ({cfg.max_minutes:g} min)"  # another epoch would not fit
            if stop or time.perf_counter() - last_save >= SAVE_EVERY_S:
                save_state(last_path, {
                    "format": STATE_FORMAT, "config": dataclasses.asdict(cfg), "epoch": epoch, "step": step,
                    "elapsed": elapsed + time.perf_counter() - t_run, "network": _cpu_state(network),
                    "heads": _cpu_state(supervised.heads) if supervised is not None else None,
                    "ema": _cpu_state(ema) if ema is not None else None, "optimizer": optimizer.state_dict(),
                    "plateau": plateau.state_dict() if plateau is not None else None, "best": best,
                    "since_best": since_best, "history": history, "rng": _rng_state(rng, aug_gen),
                    "data": {"train_ids": [r.image_id for r in train_records]},
                    "zscore": [float(mean), float(std)], "init_from": init_record,
                })
                last_save = time.perf_counter()
            if stop:
                stop_reason = stop
                break
        train_seconds = elapsed + time.perf_counter() - t_run
        print(f"stopped: {stop_reason}; trained {train_seconds / 60:.1f} min", flush=True)

        if best["state"] is None:
            raise ValueError("no epoch was trained (is --max-minutes too small, or --resume past --epochs?)")
        network.load_state_dict(best["state"])
        probs = predict_frames(network, val_z, device)
        by_threshold = {t: frame_scores(probs, val_set.masks, t)["dice"] for t in cfg.thresholds}
        threshold = max(cfg.thresholds, key=lambda t: (by_threshold[t], -abs(t - 0.5)))
        preprocessor = Preprocessor(cfg.size, mean, std)
        postprocessor = Postprocessor(threshold)
        version = cfg.version or f"{out.stem}-{datetime.now(timezone.utc):%Y%m%d}-{_weights_hash(network)}"
        label = cfg.label or default_label
        loaded = LoadedModel(network=network.eval(), preprocessor=preprocessor, postprocessor=postprocessor,
                             version=version, label=label, metrics={}, info={})
        val_scores = evaluate(loaded, val_set.records, device=str(device))
        metrics = {
            "validation": {"data": data_desc, "split": choice.info["description"], "resolution": "original",
                           **val_scores},
            "best_epoch": best["epoch"],
            "threshold": threshold,
            "val_dice_by_threshold": {f"{t:.2f}": d for t, d in by_threshold.items()},
            "train_seconds": round(train_seconds, 1),
            "stop_reason": stop_reason,
        }
        print(f"best epoch {best['epoch']}, threshold {threshold:.2f}: validation dice {val_scores['dice']:.4f} "
              f"(original resolution, postprocessed)", flush=True)
        postprocessors_tta = {}
        for mode in TRAIN_TTA_MODES if cfg.tta else ():  # TTA averages maps, which moves the best threshold
            threshold_tta, by_threshold_tta = choose_threshold(loaded, val_set.records, cfg.thresholds, tta=mode,
                                                               device=str(device))
            postprocessors_tta[mode] = with_threshold(postprocessor, threshold_tta)
            loaded.postprocessors_tta = postprocessors_tta
            val_tta = evaluate(loaded, val_set.records, device=str(device), flip_tta=mode)
            metrics.update({
                f"validation_{mode}": {"data": data_desc, "split": choice.info["description"],
                                       "resolution": "original", **val_tta},
                f"threshold_{mode}": threshold_tta,
                f"val_dice_by_threshold_{mode}_serving": {f"{t:.2f}": d for t, d in by_threshold_tta.items()},
            })
            print(f"TTA {mode}: threshold {threshold_tta:.2f}, validation dice {val_tta['dice']:.4f} "
                  f"(original resolution, postprocessed)", flush=True)
        test_root, test_desc = _resolve_test(cfg, stack)
        if test_root is not None:
            test_set = read_btxrd(test_root)
            test_scores = evaluate(loaded, test_set.records, device=str(device))
            metrics["test"] = {"data": test_desc, "resolution": "original", **test_scores}
            print(f"test ({test_desc}): dice {test_scores['dice']:.4f}, iou {test_scores['iou']:.4f}, "
                  f"mean dice on tumor images {test_scores['mean_dice_positive']:.4f}, "
                  f"normal images with a false tumor {test_scores['normal_with_false_tumor']}/{test_scores['n_normal']}",
                  flush=True)

    extra = {
        "training_config": dataclasses.asdict(cfg),
        "data": {"source": data_desc, "split": choice.info, "n_train": len(train_records), "n_val": len(val_records),
                 "n_test_in_split": choice.n_test, "problems": len(dataset.problems),
                 "train_ids": [r.image_id for r in train_records]},
        "data_license": data_license,
        "init_from": init_record,
        "history": history,
        "device": str(device),
        "torch": str(torch.__version__),  # TorchVersion is not a plain str for weights_only loading
        "command": command,
    }
    path = save_checkpoint(out, network, preprocessor=preprocessor, postprocessor=postprocessor, version=version,
                           label=label, metrics=metrics, extra=extra, half=cfg.half,
                           postprocessors_tta=postprocessors_tta)
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB), version {version}; metrics per epoch in {metrics_path}; "
          f"training state in {last_path}", flush=True)
    return path


# ---------------------------------------------------------------- command line


def _float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(f) for f in str(text).split(",") if f.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(f) for f in str(text).split(",") if f.strip())


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """Every TrainConfig field as a flag whose default is "not given" (None),
    so the chosen ``--config`` fills what the command line leaves out."""
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0],
                                epilog="Defaults: see --config and TrainConfig / PRESETS in training/train.py.")
    p.add_argument("--config", choices=sorted(PRESETS), default=None, help="named recipe (default: strong; it beat thesis on the grouped validation split, docs/training.md)")
    p.add_argument("--resume", metavar="STATE", help="go on from a <out stem>.last.pt training state")
    p.add_argument("--evaluate", metavar="CHECKPOINT", help="only score CHECKPOINT on --data / --synthetic "
                   "(python -m training.evaluate writes the full report)")
    types = {int: int, float: float, str: str}
    recipes = {name: preset(name) for name in ("thesis", "strong", "demo")}

    def shown(value) -> str:
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, tuple) else str(value)

    for f in dataclasses.fields(TrainConfig):
        if f.name == "config":
            continue
        flag = "--" + f.name.replace("_", "-")
        values = {name: getattr(cfg, f.name) for name, cfg in recipes.items()}
        help_text = ("default " + shown(values["thesis"]) if len(set(map(shown, values.values()))) == 1
                     else "; ".join(f"{name} {shown(v)}" for name, v in values.items()))
        if f.name == "filters":
            p.add_argument(flag, type=_ints, default=None, help=f"encoder widths, comma-separated ({help_text})")
        elif f.name == "thresholds":
            p.add_argument(flag, type=_floats, default=None, help=f"candidates, comma-separated ({help_text})")
        elif f.name == "focal_alpha":
            p.add_argument(flag, type=_float_or_none, default=None, help=help_text)
        elif f.type in ("bool", "bool | None"):  # --half or --half true|false
            p.add_argument(flag, type=_bool, nargs="?", const=True, default=None, metavar="true|false", help=help_text)
        elif f.type in ("str | None",):
            p.add_argument(flag, type=str, default=None, help=help_text)
        else:
            p.add_argument(flag, type=types[type(f.default)], default=None, help=help_text)
    # the old spellings
    p.add_argument("--no-augment", dest="augment", action="store_const", const="none")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str | None, str | None]:
    """-> (config, checkpoint to evaluate or None, state to resume or None)."""
    args = vars(build_parser().parse_args(argv))
    name, evaluate_path, resume_path = args.pop("config"), args.pop("evaluate"), args.pop("resume")
    given = {k: v for k, v in args.items() if v is not None}
    if resume_path:
        state = load_state(resume_path)
        bad = sorted(set(given) - set(RESUME_OVERRIDES))
        if bad or name:
            raise ValueError(f"--resume takes its config from the state file; only {', '.join(RESUME_OVERRIDES)} "
                             f"may be given with it, got {', '.join(bad or ['--config'])}")
        saved = state["config"]
        saved["filters"], saved["thresholds"] = tuple(saved["filters"]), tuple(saved["thresholds"])
        return TrainConfig(**{**saved, **given}), evaluate_path, resume_path
    return preset(name or DEFAULT_CONFIG, **given), evaluate_path, None


def main(argv: list[str] | None = None) -> int:
    cfg, evaluate_path, resume_path = parse_args(argv)
    # Freed activations and gradients stay in the process: on the 2-core CPU a training step of the
    # half-width network at 256 px then ran 1.34x faster in bf16 and 1.63x in fp32 (bonedetect/allocator.py).
    allocator.apply_from_env()
    if evaluate_path:
        torch.set_num_threads(os.cpu_count() or 1)
        loaded = load_checkpoint(evaluate_path)
        with contextlib.ExitStack() as stack:
            root, desc = _resolve_data(cfg, stack)
            dataset = read_btxrd(root)
            t0 = time.perf_counter()
            scores = evaluate(loaded, dataset.records, device=cfg.device)
        print(f"{evaluate_path} ({loaded.version}, {loaded.label}) on {desc}: "
              f"{len(dataset.records)} images [{time.perf_counter() - t0:.0f}s]")
        print(json.dumps(scores, indent=2))
        return 0
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m training.train", *map(shlex.quote, argv)])
    train(cfg, command=command, resume=load_state(resume_path) if resume_path else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
