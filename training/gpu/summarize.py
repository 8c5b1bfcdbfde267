"""Summarise a run of training/gpu/run_btxrd.sh as one Markdown table (stdout).

    python training/gpu/summarize.py runs/gpu thesis strong

Reads, for each config, ``btxrd-256-<config>.metrics.jsonl`` (one line per
epoch), ``train-<config>.log`` (the stop reason) and the ``metrics.json`` of
``eval-<config>-<split>[-tta]/``; needs nothing but the standard library.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _eval(work: Path, name: str) -> dict | None:
    path = work / name / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _dice(m: dict | None, column: str) -> str:
    return "n/a" if m is None else f"{m['table'][column]['dice']:.4f}"


def summarize(work: Path, configs: list[str]) -> str:
    lines = ["# BTXRD-256 on the grouped split", "",
             "| config | epochs | stopped | best epoch (val Dice in training) | val Dice pooled | val Dice per image "
             "| val Dice pooled, flip TTA | test Dice pooled | test Dice per image | test Dice pooled, flip TTA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    val_dice = {}
    split_desc = None
    for cfg in configs:
        history_path = work / f"btxrd-256-{cfg}.metrics.jsonl"
        history = [json.loads(s) for s in history_path.read_text().splitlines()] if history_path.is_file() else []
        log = work / f"train-{cfg}.log"
        stopped = next((s.split(":", 1)[1].strip() for s in (log.read_text().splitlines() if log.is_file() else [])
                        if s.startswith("stopped:")), "did not finish")
        best = max(history, key=lambda r: r["val_dice"]) if history else None
        val, test = _eval(work, f"eval-{cfg}-val"), _eval(work, f"eval-{cfg}-test")
        val_tta, test_tta = _eval(work, f"eval-{cfg}-val-tta"), _eval(work, f"eval-{cfg}-test-tta")
        if val is not None:
            val_dice[cfg] = val["table"]["pooled"]["dice"]
            split_desc = val["meta"]["split"]["description"]
        best_text = f"{best['epoch']} ({best['val_dice']:.4f})" if best else "n/a"
        lines.append(f"| {cfg} | {len(history)} | {stopped} | {best_text} | {_dice(val, 'pooled')} | "
                     f"{_dice(val, 'per_image')} | {_dice(val_tta, 'pooled')} | {_dice(test, 'pooled')} | "
                     f"{_dice(test, 'per_image')} | {_dice(test_tta, 'pooled')} |")
    lines += ["", f"Split: {split_desc or 'n/a'}. Scores at each image's original size through the serving path; "
              "thresholds from validation. The thesis reports test Dice 0.5633 on an image-level split.", ""]
    if "thesis" in val_dice and "strong" in val_dice:
        verdict = "beats" if val_dice["strong"] > val_dice["thesis"] else "does not beat"
        lines.append(f"strong {verdict} thesis on the grouped validation split (pooled Dice, no TTA): "
                     f"{val_dice['strong']:.4f} vs {val_dice['thesis']:.4f}.")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__.strip())
        raise SystemExit(2)
    print(summarize(Path(sys.argv[1]), sys.argv[2:]))
