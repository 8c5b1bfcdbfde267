"""Choose a checkpoint's decision threshold on validation, the way it is served.

Commands::

    # the threshold for workers started with INFER_TTA=flip, written into a copy of the checkpoint
    python -m training.thresholds model/checkpoints/btxrd-256.pt --data ../shared/data/btxrd-256 \\
        --split-file training/splits/btxrd-256-grouped-v1.csv --tta --out runs/btxrd-256-tta.pt

Why: averaging the plain and the mirrored probability map (flip TTA) makes
the map smoother, so the threshold that gives the best Dice moves (the shipped
model of 2026-11-28: 0.25 plain, 0.35 with flip TTA on grouped validation).
A checkpoint can carry a second postprocessing for flip TTA
(``LoadedModel.postprocessor_tta``); ``Segmenter`` uses it while flip TTA is on.

How: every image of the validation split goes through the serving path
(``Segmenter`` at its original resolution, with or without flip TTA) once;
each candidate threshold is applied with the checkpoint's postprocessing
(minimum region, hole filling) and scored by pooled Dice over the split.
Ties go to the candidate nearest 0.5. Only the validation (or training)
split can be used: a threshold chosen on the test split would make its
score a tuned one.

The written checkpoint has the same weights and preprocessing; its version
gains a suffix naming what changed (``-tta35``: flip-TTA threshold 0.35;
``-t25``: plain threshold 0.25), so result rows tell the two files apart.
"""

from __future__ import annotations

import argparse

import numpy as np

from model.checkpoint import LoadedModel
from model.postprocess import Postprocessor

DEFAULT_CANDIDATES = (0.05, 0.07, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50)


def _with_threshold(post: Postprocessor, threshold: float) -> Postprocessor:
    return Postprocessor(threshold=threshold, min_region_fraction=post.min_region_fraction, fill_holes=post.fill_holes)


def choose_threshold(loaded: LoadedModel, records, candidates=DEFAULT_CANDIDATES, tta: bool = False,
                     device: str | None = None, batch_size: int | None = None,
                     cpu_bf16: bool = False) -> tuple[float, dict[float, float]]:
    """(best threshold, {candidate: pooled Dice}) on ``records`` through the serving path (module docstring).

    The postprocessing around the threshold is the checkpoint's own (its
    flip-TTA one with ``tta`` when it has one).

    Raises:
        ValueError: no candidates, a candidate outside (0, 1), or no records.
    """
    from model.inference import Segmenter, postprocess_cropped
    from training.btxrd import load_image, load_mask

    candidates = sorted({float(t) for t in candidates})
    if not candidates or not all(0.0 < t < 1.0 for t in candidates):
        raise ValueError(f"thresholds must be values in (0, 1), got {candidates}")
    if not records:
        raise ValueError("no images to choose a threshold on")
    segmenter = Segmenter(loaded, device=device, batch_size=batch_size, flip_tta=tta, cpu_bf16=cpu_bf16)
    base = segmenter.postprocessor
    posts = {t: _with_threshold(base, t) for t in candidates}
    counts = {t: np.zeros(3, np.int64) for t in candidates}  # tp, fp, fn
    chunk = max(segmenter.batch_size, 32)
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        images = [load_image(r) for r in part]
        for record, image, pred in zip(part, images, segmenter.predict(images)):
            truth = load_mask(record, image.shape) != 0
            n_truth = int(np.count_nonzero(truth))
            for t in candidates:
                mask = postprocess_cropped(posts[t], pred.prob) != 0
                tp = int(np.count_nonzero(mask & truth))
                counts[t] += (tp, int(np.count_nonzero(mask)) - tp, n_truth - tp)
    dice = {}
    for t, (tp, fp, fn) in counts.items():
        dice[t] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    best = max(candidates, key=lambda t: (dice[t], -abs(t - 0.5)))
    return best, dice


def version_suffix(threshold: float, tta: bool) -> str:
    return f"-{'tta' if tta else 't'}{round(threshold * 100):02d}"


def main(argv: list[str] | None = None) -> int:
    from model.checkpoint import load_checkpoint, save_checkpoint
    from training.btxrd import read_btxrd
    from training.split import assign, read_split_csv

    p = argparse.ArgumentParser(prog="python -m training.thresholds", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="folder in BTXRD's layout")
    p.add_argument("--split-file", required=True, help="split CSV (training/splits/...)")
    p.add_argument("--split", choices=("val", "train"), default="val", help="where to choose (never test)")
    p.add_argument("--tta", action="store_true", help="choose the flip-TTA threshold (INFER_TTA=flip) instead of the plain one")
    p.add_argument("--thresholds", default=",".join(f"{t:g}" for t in DEFAULT_CANDIDATES), help="candidates, comma-separated")
    p.add_argument("--out", required=True, help="where the checkpoint with the chosen threshold goes")
    p.add_argument("--version", help="its version (default: the old one with a suffix, module docstring)")
    p.add_argument("--device", default=None)
    p.add_argument("--cpu-bf16", action="store_true", help="on a CPU, score with the network in bf16 autocast")
    args = p.parse_args(argv)

    loaded = load_checkpoint(args.checkpoint)
    parts, problems = assign(read_btxrd(args.data).records, read_split_csv(args.split_file))
    if problems:
        print(f"warning: {len(problems)} images differ between the data and the split file")
    records = parts[args.split]
    candidates = [float(v) for v in args.thresholds.split(",") if v.strip()]
    best, dice = choose_threshold(loaded, records, candidates, tta=args.tta, device=args.device, cpu_bf16=args.cpu_bf16)
    mode = "flip TTA" if args.tta else "plain"
    print(f"{len(records)} {args.split} images, {mode}: " + " ".join(f"{t:.2f}:{d:.4f}" for t, d in dice.items()))
    print(f"chosen: {best:.2f} (pooled Dice {dice[best]:.4f})")

    plain, tta_post = loaded.postprocessor, loaded.postprocessor_tta
    if args.tta:
        tta_post = _with_threshold(tta_post or plain, best)
    else:
        plain = _with_threshold(plain, best)
    metrics = dict(loaded.metrics)
    metrics["threshold_tta" if args.tta else "threshold"] = best
    metrics[f"val_dice_by_threshold{'_tta' if args.tta else ''}_serving"] = {f"{t:.2f}": d for t, d in dice.items()}
    extra = {k: v for k, v in loaded.info.items() if k not in ("format", "created_at", "network_config")}
    extra.setdefault("threshold_choices", []).append(
        {"from_version": loaded.version, "split": args.split, "split_file": args.split_file, "tta": args.tta,
         "threshold": best, "dice": dice[best]})
    version = args.version or loaded.version + version_suffix(best, args.tta)
    half = bool((loaded.info.get("training_config") or {}).get("half"))  # as it was stored: fp16 -> fp32 -> fp16 is exact
    path = save_checkpoint(args.out, loaded.network, preprocessor=loaded.preprocessor, postprocessor=plain,
                           postprocessor_tta=tta_post, version=version, label=loaded.label, metrics=metrics,
                           extra=extra, half=half)
    print(f"saved {path}, version {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
