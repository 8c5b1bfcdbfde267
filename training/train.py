"""Train the attention U-Net on images in BTXRD's layout; score checkpoints.

The shipped demo checkpoint (synthetic data only; about 5 minutes on a 2-core
CPU; model/checkpoints/README.md has its numbers)::

    python -m training.train --synthetic 400 --synthetic-seed 0 \\
        --test-synthetic 200 --test-seed 1 \\
        --out model/checkpoints/synthetic-demo.pt --metrics-file runs/synthetic-demo.metrics.jsonl \\
        --size 192 --filters 8,16,32,64,128 --dropout 0 --epochs 30 --batch-size 8 --lr 2e-3 --seed 0 \\
        --label "synthetic, not for clinical use"

Real BTXRD-256, on a GPU (its CC BY-NC-ND 4.0 terms carry over to the checkpoint)::

    python -m training.train --data ../shared/data/btxrd-256 --out runs/btxrd.pt \\
        --label "BTXRD, non-commercial research only, not for clinical use"

Score an existing checkpoint on a folder in BTXRD's layout, or on fresh
synthetic images (at the original resolution, through the serving path)::

    python -m training.train --evaluate model/checkpoints/synthetic-demo.pt --synthetic 200 --synthetic-seed 1

What it does: read the folder with ``training.btxrd``; split it with
``training.split.stratified_split`` (seeded, stratified by tumor type,
normals their own stratum); put every image through ``to_unit_float`` and
``Preprocessor(size)`` (the serving code path) and its mask through
``Preprocessor.resize_mask``; measure the z-score mean/std on the training
split; train with Adam (cosine learning rate) on Dice + Focal with flips,
small rotations and gain/gamma changes applied to image and mask together;
after every epoch score the validation split with ``model.metrics`` and
append a line to the metrics file (JSONL); keep the best epoch; choose the
decision threshold on validation (0.30, 0.35, ..., 0.70); score validation
(and the test set, if given) at the original resolution through
``model.inference.Segmenter``; save with ``model.checkpoint.save_checkpoint``
including the resolved config.
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

from model.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from model.inference import Segmenter
from model.metrics import MetricAccumulator
from model.network import AttentionUNet, UNetConfig
from model.postprocess import Postprocessor
from model.preprocess import Preprocessor, to_unit_float
from training.btxrd import BtxrdRecord, load_image, load_mask, read_btxrd
from training.losses import DiceFocalLoss
from training.split import stratified_split
from training.synthetic import generate_dataset, is_synthetic

SYNTHETIC_LICENSE = "synthetic images from training.synthetic; no real patient data"
OTHER_LICENSE = ("the terms of the training data apply; BTXRD (the reference data) is CC BY-NC-ND 4.0, "
                 "so a model trained on it is for non-commercial use only")


@dataclass
class TrainConfig:
    # data: a folder in BTXRD's layout, or synthetic images generated first
    data: str | None = None
    synthetic: int = 0  # > 0: generate this many synthetic images (instead of --data)
    synthetic_seed: int = 0
    work: str | None = None  # where synthetic images go; a temporary folder when None
    test: str | None = None  # optional held-out folder, scored once after training
    test_synthetic: int = 0  # > 0: generate a held-out synthetic test set of this size
    test_seed: int = 1  # its seed; must differ from synthetic_seed to be held out
    val_fraction: float = 0.2
    # network and preprocessing
    size: int = 256  # frame side; a multiple of 2 ** (len(filters) - 1)
    filters: tuple[int, ...] = (32, 64, 128, 256, 512)  # the thesis network
    dropout: float = 0.3  # the thesis's value; 0 trains small networks faster
    # optimisation
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3  # Adam; cosine decay to lr / 20 over all steps
    weight_decay: float = 0.0
    dice_weight: float = 1.0
    focal_weight: float = 1.0
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    output_prior: float = 0.01  # initial tumor probability everywhere (output bias, as in Lin et al. 2017); 0: keep 0.5
    augment: bool = True
    max_rotation: float = 10.0  # degrees, uniform in [-x, x]
    seed: int = 0
    device: str | None = None  # None: cuda if available, else cpu
    # output
    out: str = "runs/model.pt"
    metrics_file: str | None = None  # None: next to --out, <stem>.metrics.jsonl
    label: str | None = None  # None: derived from the data ("synthetic, not for clinical use", ...)
    version: str | None = None  # None: "<out stem>-<YYYYMMDD>-<weights hash>"
    half: bool = False  # store weights as fp16


THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(9))  # 0.30 .. 0.70


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
    """Same random flip and rotation on both; gain and gamma on the image only.

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


# ---------------------------------------------------------------- training


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


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
        with _autocast(device):
            logits = network(_batch(images_z[start : start + batch_size], device))
        out.append(torch.sigmoid(logits.float())[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + images_z.shape[1:], np.float32)


def frame_scores(probs: np.ndarray, masks: np.ndarray, threshold: float) -> dict:
    acc = MetricAccumulator()
    acc.update_batch(probs > threshold, masks)
    return acc.summary()


def evaluate(loaded: LoadedModel, records: list[BtxrdRecord], device: str | None = None, batch_size: int = 16) -> dict:
    """Scores at the original resolution through ``Segmenter`` (the serving
    path, postprocessing included): pooled and per-image (module
    ``model.metrics``), normal images counted (an empty prediction on a normal
    image scores 1), plus the share of normal images given any tumor pixel."""
    segmenter = Segmenter(loaded, device=device, batch_size=batch_size)
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
    """Cosine from lr to lr / 20 over ``total`` steps."""
    floor = lr / 20
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _weights_hash(network) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:8]


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


def train(cfg: TrainConfig, command: str | None = None) -> Path:
    """Run one training (module docstring) and return the checkpoint path.
    ``command``: the command line, recorded in the checkpoint."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = _device(cfg.device)
    net_config = UNetConfig(filters=tuple(cfg.filters), dropout=cfg.dropout)
    if cfg.size % net_config.multiple:
        raise ValueError(f"--size {cfg.size} is not divisible by {net_config.multiple} (needed by {len(cfg.filters)} levels)")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"--epochs and --batch-size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    out = Path(cfg.out)
    metrics_path = Path(cfg.metrics_file) if cfg.metrics_file else out.with_name(out.stem + ".metrics.jsonl")

    with contextlib.ExitStack() as stack:
        root, data_desc = _resolve_data(cfg, stack)
        dataset = read_btxrd(root)
        synthetic = is_synthetic(root)
        if dataset.problems:
            print(f"{len(dataset.problems)} data problems (see python -m training.btxrd {root} --problems)", flush=True)
        if len(dataset.records) < 2:
            raise ValueError(f"{root}: need at least 2 usable images, found {len(dataset.records)}")
        train_idx, val_idx = stratified_split([r.stratum for r in dataset.records], cfg.val_fraction, cfg.seed)
        if not val_idx:
            raise ValueError("the validation split is empty: raise --val-fraction or add images")
        t0 = time.perf_counter()
        train_set = prepare_frames([dataset.records[i] for i in train_idx], cfg.size)
        val_set = prepare_frames([dataset.records[i] for i in val_idx], cfg.size)
        mean, std = intensity_stats(train_set)
        print(f"data: {len(train_idx)} train, {len(val_idx)} val, mean {mean:.4f} std {std:.4f} "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)
        val_z = (val_set.images - mean) / std

        network = AttentionUNet(net_config)
        if cfg.output_prior:
            set_output_prior(network, cfg.output_prior)
        network = network.to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        loss_fn = DiceFocalLoss(cfg.dice_weight, cfg.focal_weight, cfg.focal_gamma, cfg.focal_alpha)
        steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
        total_steps = cfg.epochs * steps_per_epoch
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
        history, best = [], {"dice": -1.0, "epoch": 0, "state": None}
        step, t_train = 0, time.perf_counter()
        for epoch in range(1, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            network.train()
            order = rng.permutation(len(train_idx))
            losses = []
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                pairs = [augment(train_set.images[i], train_set.masks[i], rng, cfg.max_rotation) if cfg.augment
                         else (train_set.images[i], train_set.masks[i]) for i in batch]
                x = _batch((np.stack([p[0] for p in pairs]) - mean) / std, device)
                y = _batch(np.stack([p[1] for p in pairs]), device)
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, total_steps, cfg.lr)
                with _autocast(device):
                    logits = network(x)
                loss = loss_fn(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step += 1
            probs = predict_frames(network, val_z, device)
            with torch.no_grad():
                val_loss = float(loss_fn(torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6))[:, None],
                                         torch.from_numpy(val_set.masks)[:, None].float()))
            scores = frame_scores(probs, val_set.masks, 0.5)
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, "val_loss": val_loss,
                   "val_dice": scores["dice"], "val_iou": scores["iou"],
                   "val_mean_dice_positive": scores["mean_dice_positive"],
                   "lr": _lr_at(step, total_steps, cfg.lr), "seconds": round(time.perf_counter() - t_epoch, 2)}
            history.append(row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            improved = scores["dice"] > best["dice"]
            if improved:
                best = {"dice": scores["dice"], "epoch": epoch, "state": copy.deepcopy(network.state_dict())}
            print(f"epoch {epoch:3d}/{cfg.epochs}  loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
                  f"val dice {scores['dice']:.4f}{' *' if improved else '  '}  {row['seconds']:.1f}s", flush=True)
        train_seconds = time.perf_counter() - t_train

        network.load_state_dict(best["state"])
        probs = predict_frames(network, val_z, device)
        by_threshold = {t: frame_scores(probs, val_set.masks, t)["dice"] for t in THRESHOLDS}
        threshold = max(THRESHOLDS, key=lambda t: (by_threshold[t], -abs(t - 0.5)))
        preprocessor = Preprocessor(cfg.size, mean, std)
        postprocessor = Postprocessor(threshold)
        version = cfg.version or f"{out.stem}-{datetime.now(timezone.utc):%Y%m%d}-{_weights_hash(network)}"
        label = cfg.label or ("synthetic, not for clinical use" if synthetic else "research only, not for clinical use")
        loaded = LoadedModel(network=network.eval(), preprocessor=preprocessor, postprocessor=postprocessor,
                             version=version, label=label, metrics={}, info={})
        val_scores = evaluate(loaded, val_set.records, device=str(device))
        metrics = {
            "validation": {"data": data_desc, "split": f"stratified {1 - cfg.val_fraction:.0%}/{cfg.val_fraction:.0%}, seed {cfg.seed}",
                           "resolution": "original", **val_scores},
            "best_epoch": best["epoch"],
            "threshold": threshold,
            "val_dice_by_threshold": {f"{t:.2f}": d for t, d in by_threshold.items()},
            "train_seconds": round(train_seconds, 1),
        }
        print(f"best epoch {best['epoch']}, threshold {threshold:.2f}: validation dice {val_scores['dice']:.4f} "
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
        "data": {"source": data_desc, "n_train": len(train_idx), "n_val": len(val_idx),
                 "problems": len(dataset.problems)},
        "data_license": SYNTHETIC_LICENSE if synthetic else OTHER_LICENSE,
        "history": history,
        "device": str(device),
        "torch": str(torch.__version__),  # TorchVersion is not a plain str for weights_only loading
        "command": command,
    }
    path = save_checkpoint(out, network, preprocessor=preprocessor, postprocessor=postprocessor, version=version,
                           label=label, metrics=metrics, extra=extra, half=cfg.half)
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB), version {version}; metrics per epoch in {metrics_path}",
          flush=True)
    return path


# ---------------------------------------------------------------- command line


def _floats_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=defaults.data, help="folder in BTXRD's layout")
    p.add_argument("--synthetic", type=int, default=defaults.synthetic, help="generate N synthetic images and use them")
    p.add_argument("--synthetic-seed", type=int, default=defaults.synthetic_seed)
    p.add_argument("--work", default=defaults.work, help="folder for generated data (default: a temporary one)")
    p.add_argument("--test", default=defaults.test, help="held-out folder in BTXRD's layout, scored after training")
    p.add_argument("--test-synthetic", type=int, default=defaults.test_synthetic, help="generate N held-out synthetic images")
    p.add_argument("--test-seed", type=int, default=defaults.test_seed)
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    p.add_argument("--size", type=int, default=defaults.size)
    p.add_argument("--filters", default=",".join(map(str, defaults.filters)), help="encoder widths, comma-separated")
    p.add_argument("--dropout", type=float, default=defaults.dropout)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--dice-weight", type=float, default=defaults.dice_weight)
    p.add_argument("--focal-weight", type=float, default=defaults.focal_weight)
    p.add_argument("--focal-gamma", type=float, default=defaults.focal_gamma)
    p.add_argument("--focal-alpha", type=_floats_or_none, default=defaults.focal_alpha)
    p.add_argument("--output-prior", type=float, default=defaults.output_prior,
                   help="initial tumor probability (output bias); 0 keeps the network's own init")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--max-rotation", type=float, default=defaults.max_rotation)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--out", default=defaults.out)
    p.add_argument("--metrics-file", default=defaults.metrics_file)
    p.add_argument("--label", default=defaults.label)
    p.add_argument("--version", default=defaults.version)
    p.add_argument("--half", action="store_true", default=defaults.half)
    p.add_argument("--evaluate", metavar="CHECKPOINT", help="only score CHECKPOINT on --data / --synthetic")
    args = vars(p.parse_args(argv))
    evaluate_path = args.pop("evaluate")
    try:
        args["filters"] = tuple(int(f) for f in str(args["filters"]).split(",") if f.strip())
    except ValueError:
        p.error(f"--filters must be comma-separated ints, got {args['filters']!r}")
    return TrainConfig(**args), evaluate_path


def main(argv: list[str] | None = None) -> int:
    cfg, evaluate_path = parse_args(argv)
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
    train(cfg, command=" ".join(["python -m training.train", *map(shlex.quote, argv)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
