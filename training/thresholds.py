"""Choose a checkpoint's decision threshold on validation, the way it is served.

Commands::

    # the threshold for workers started with INFER_TTA=flip4, written into a copy of the checkpoint
    python -m training.thresholds model/checkpoints/btxrd-256.pt --data ../shared/data/btxrd-256 \\
        --split-file training/splits/btxrd-256-grouped-v1.csv --tta flip4 --out runs/btxrd-256-flip4.pt

Why: averaging the probability maps of mirrored copies (TTA) makes the map
smoother, so the threshold that gives the best Dice moves (run 5 of the
shipped model, grouped validation: 0.25 plain, 0.35 with either TTA mode).
A checkpoint can carry a postprocessing per TTA mode
(``LoadedModel.postprocessors_tta``); ``Segmenter`` uses the one of its mode.

How: every image of the validation split goes through the serving path
(``Segmenter`` at its original resolution, in the TTA mode asked for) once;
each candidate threshold is applied with the checkpoint's postprocessing
(minimum region, hole filling) and scored by pooled Dice over the split.
Ties go to the candidate nearest 0.5. Only the validation split is used, and
only of the split file the checkpoint was trained with (``--other-split``
overrides that): a threshold chosen on test images would make their score a
tuned one.

The written checkpoint has the same weights and preprocessing; its version
gains a suffix naming what changed (``-flip4-t0.35``: threshold 0.35 under
INFER_TTA=flip4; ``-t0.25``: plain threshold 0.25), so result rows tell the
two files apart.
Metrics scored at the old threshold move under ``before_threshold_choice``;
``threshold_choices`` in the file's info lists every choice made. With
``--recommend`` the mode becomes the checkpoint's own (``recommended_tta``):
workers with INFER_TTA=auto, the default, serve it so.
"""

from __future__ import annotations

import argparse

import numpy as np

from model.checkpoint import LoadedModel
from model.inference import TTA_MODES, tta_mode
from model.postprocess import Postprocessor

DEFAULT_CANDIDATES = (0.05, 0.07, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50)



def metric_keys(mode: str) -> tuple[str, ...]:
    """The metrics a threshold choice for TTA ``mode`` makes stale ("threshold", "validation", ... for "off";
    "threshold_flip4", ... for "flip4"): the copy moves them under "before_threshold_choice"."""
    if mode == "off":
        return "threshold", "validation", "test", "val_dice_by_threshold", "val_dice_by_threshold_serving"
    return f"threshold_{mode}", f"validation_{mode}", f"val_dice_by_threshold_{mode}_serving"


def with_threshold(post: Postprocessor, threshold: float) -> Postprocessor:
    """``post`` with another threshold, everything else kept."""
    return Postprocessor(**{**post.as_dict(), "threshold": float(threshold)})


def choose_threshold(loaded: LoadedModel, records, candidates=DEFAULT_CANDIDATES, tta: bool | str = False,
                     device: str | None = None, batch_size: int | None = None,
                     cpu_bf16: bool = False) -> tuple[float, dict[float, float]]:
    """(best threshold, {candidate: pooled Dice}) on ``records`` through the serving path (module docstring).

    ``tta``: a TTA mode (``model.inference.TTA_FLIPS``; True: "flip"). The
    postprocessing around the threshold is the checkpoint's own (its one for
    that mode when it has one).

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
    posts = {t: with_threshold(base, t) for t in candidates}
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


def version_suffix(threshold: float, mode: str = "off") -> str:
    """"-flip4-t0.35" / "-t0.25": the threshold as written (%g), so two thresholds never share a suffix."""
    return (f"-{mode}" if mode != "off" else "") + f"-t{threshold:g}"


def check_held_out(loaded: LoadedModel, split_file_sha256: str, records, other_split: bool = False) -> None:
    """Refuse a choice that could see the checkpoint's test split or training images.

    Raises:
        ValueError: the split file is not the one the checkpoint was trained with (its validation part may hold
            the training split's test images) unless ``other_split``; or some records were trained on.
    """
    trained = ((loaded.info.get("data") or {}).get("split") or {}).get("sha256")
    if trained and trained != split_file_sha256 and not other_split:
        raise ValueError("the split file is not the one the checkpoint was trained with (SHA-256 "
                         f"{split_file_sha256[:12]} against {trained[:12]}): its validation images may be the "
                         "trained split's test images; pass --other-split only if you know they are not")
    train_ids = set((loaded.info.get("data") or {}).get("train_ids") or [])
    seen = [r.image_id for r in records if r.image_id in train_ids]
    if seen:
        raise ValueError(f"{len(seen)} of these {len(records)} images were in the checkpoint's training set "
                         f"(first: {seen[0]}): a threshold is chosen on held-out images")


def main(argv: list[str] | None = None) -> int:
    from model.checkpoint import load_checkpoint, save_checkpoint, saved_extra
    from training.btxrd import read_btxrd
    from training.split import assign, read_split_csv

    p = argparse.ArgumentParser(prog="python -m training.thresholds", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="folder in BTXRD's layout")
    p.add_argument("--split-file", required=True, help="split CSV (training/splits/...)")
    p.add_argument("--tta", choices=[m for m in TTA_MODES if m != "off"], default=None,
                   help="choose the threshold for this INFER_TTA mode instead of the plain one")
    p.add_argument("--thresholds", default=",".join(f"{t:g}" for t in DEFAULT_CANDIDATES), help="candidates, comma-separated")
    p.add_argument("--recommend", action="store_true",
                   help="with --tta: make that mode the one workers serve the copy with by default (INFER_TTA=auto)")
    p.add_argument("--out", required=True, help="where the checkpoint with the chosen threshold goes")
    p.add_argument("--version", help="its version (default: the old one with a suffix, module docstring)")
    p.add_argument("--other-split", action="store_true",
                   help="allow a split file other than the one the checkpoint was trained with")
    p.add_argument("--device", default=None)
    p.add_argument("--cpu-bf16", action="store_true", help="on a CPU, score with the network in bf16 autocast")
    args = p.parse_args(argv)

    if args.recommend and not args.tta:
        p.error("--recommend needs --tta MODE")
    loaded = load_checkpoint(args.checkpoint)
    split_file = read_split_csv(args.split_file)
    parts, problems = assign(read_btxrd(args.data).records, split_file)
    if problems:
        print(f"warning: {len(problems)} images differ between the data and the split file")
    records = parts["val"]  # never test; never the images it was trained on (check_held_out)
    try:
        check_held_out(loaded, split_file.sha256, records, args.other_split)
    except ValueError as exc:
        p.error(str(exc))
    candidates = [float(v) for v in args.thresholds.split(",") if v.strip()]
    mode = tta_mode(args.tta)
    best, dice = choose_threshold(loaded, records, candidates, tta=mode, device=args.device, cpu_bf16=args.cpu_bf16)
    print(f"{len(records)} validation images, TTA {mode}: " + " ".join(f"{t:.2f}:{d:.4f}" for t, d in dice.items()))
    print(f"chosen: {best:.2f} (pooled Dice {dice[best]:.4f})")

    plain, tta_posts = loaded.postprocessor, dict(loaded.postprocessors_tta)
    if mode != "off":
        tta_posts[mode] = with_threshold(loaded.postprocessor_for(mode), best)
    else:
        plain = with_threshold(plain, best)
    stale = {k: loaded.metrics[k] for k in metric_keys(mode) if k in loaded.metrics}
    metrics = {k: v for k, v in loaded.metrics.items() if k not in stale}
    if stale:
        metrics["before_threshold_choice"] = {**metrics.get("before_threshold_choice", {}), **stale}
    suffix = f"_{mode}" if mode != "off" else ""
    metrics[f"threshold{suffix}"] = best
    metrics[f"val_dice_by_threshold{suffix}_serving"] = {f"{t:.2f}": d for t, d in dice.items()}
    metrics[f"validation{suffix}"] = {"dice": dice[best], "split": f"`val` of {split_file.describe()}",
                                      "resolution": "original", "scored_by": "training.thresholds (pooled Dice only)"}
    extra = saved_extra(loaded)
    extra["threshold_choices"] = [*extra.get("threshold_choices", []), {
        "from_version": loaded.version, "split_file": split_file.name, "split_sha256": split_file.sha256,
        "tta": mode, "threshold": best, "dice": dice[best]}]
    version = args.version or loaded.version + version_suffix(best, mode)
    path = save_checkpoint(args.out, loaded.network, preprocessor=loaded.preprocessor, postprocessor=plain,
                           postprocessors_tta=tta_posts, version=version, label=loaded.label, metrics=metrics,
                           extra=extra, half=loaded.info["stored_half"],  # fp16 -> fp32 -> fp16 is exact
                           recommended_tta=mode if args.recommend else loaded.recommended_tta)
    print(f"saved {path}, version {version}" + (f"; served with TTA {mode} by default" if args.recommend else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
