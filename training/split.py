"""Seeded train/validation splits.

``stratified_split`` is the simple split used now: within each stratum (the
tumor type; normal images are their own stratum) a seeded shuffle, then the
last ``round(val_fraction * n)`` go to validation. Image-level: views of the
same patient can land on both sides, which flatters validation scores on real
BTXRD (a grouped split will sit next to this one).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def stratified_split(strata: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, val) of items whose stratum keys are ``strata``.

    Each stratum with at least 2 items gives at least one item to each side
    (when ``val_fraction`` > 0); a stratum of 1 stays in training. Both lists
    are sorted; the result depends only on ``strata``, ``val_fraction`` and
    ``seed``.

    Raises:
        ValueError: when ``val_fraction`` is not in [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(strata):
        groups[key].append(i)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for key in sorted(groups):  # sorted: independent of the order strata first appear
        idx = np.array(groups[key])
        rng.shuffle(idx)
        n_val = int(round(val_fraction * len(idx)))
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val += idx[len(idx) - n_val:].tolist() if n_val else []
        train += idx[: len(idx) - n_val].tolist()
    return sorted(train), sorted(val)
