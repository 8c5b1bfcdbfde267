"""Seeded splits of a BTXRD-layout folder, written to versioned CSV files.

Three kinds, all stratified by tumor type (normal images are their own
stratum) and all depending only on their inputs and a seed:

- ``thesis``: the thesis's image-level split, 72 % train / 18 % validation /
  10 % test within every tumor type. Views of one patient can land on both
  sides of it, which flatters scores on real BTXRD (the split report counts
  how many likely-patient groups straddle it).
- ``grouped``: the leakage-safe split. Images that share centre, age,
  gender, bones and tumor type (``patient_group_key``: most likely one
  patient's views) form a group, and a group never straddles two splits.
  Groups are assigned whole, per tumor type, largest first, each to the split
  furthest below its share, so every tumor type is close to 72/18/10 at
  image level.
- ``stratified_split``: the older two-way (train/val) image-level split that
  the synthetic demo checkpoint was trained with (``--config demo``).

A split file is a CSV with one row per image (only identifiers and the
assignment: no pixels, no outlines, safe to commit)::

    image_id,split,group_id,tumor_type
    IMG000001,train,g3f2a9c01d4,osteosarcoma

Files are versioned by name (``training/splits/btxrd-256-grouped-v1.csv``);
the writer never silently changes an existing file: bump the version.
Every training run and report records the split file's name and SHA-256.

Command (regenerates both files and prints how each one is made up)::

    python -m training.split ../shared/data/btxrd-256 --name btxrd-256 --version 1
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
THESIS_FRACTIONS = (0.72, 0.18, 0.10)  # train, val, test
SPLIT_COLUMNS = ("image_id", "split", "group_id", "tumor_type")
SPLITS_DIR = Path(__file__).parent / "splits"


# ---------------------------------------------------------------- the old two-way split


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


# ---------------------------------------------------------------- three-way splits


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers (train, val, test) summing to 1, got {fractions}")
    if fractions[0] == 0:
        raise ValueError(f"the train fraction must be > 0, got {fractions}")
    return fractions


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Split n items into len(fractions) whole counts as close to n * f as possible."""
    exact = [n * f for f in fractions]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def thesis_split(strata: Sequence[str], fractions: Sequence[float] = THESIS_FRACTIONS, seed: int = 0) -> list[str]:
    """The thesis's image-level split: one of SPLITS per item.

    Within each stratum (sorted by name), a seeded shuffle, then the first
    items go to train, the next to val, the last to test, in counts given by
    the largest-remainder rounding of ``fractions`` (so 10 % of 267 is 27).

    Raises:
        ValueError: for fractions that are not 3 non-negative numbers summing to 1.
    """
    fractions = _check_fractions(fractions)
    by_stratum: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(strata):
        by_stratum[key].append(i)
    rng = np.random.default_rng(seed)
    out = [""] * len(strata)
    for key in sorted(by_stratum):
        idx = np.array(by_stratum[key])
        rng.shuffle(idx)
        start = 0
        for name, count in zip(SPLITS, _largest_remainder(len(idx), fractions)):
            for i in idx[start : start + count]:
                out[int(i)] = name
            start += count
    return out


def grouped_split(strata: Sequence[str], groups: Sequence[str], fractions: Sequence[float] = THESIS_FRACTIONS,
                  seed: int = 0) -> list[str]:
    """A split in which every group lies in exactly one of SPLITS.

    Each group takes the stratum most of its items have. Per stratum (sorted
    by name): the groups are shuffled with the seed, ordered by size (largest
    first, the shuffle breaking ties), and each goes to the split whose image
    count is furthest below its target ``fraction * images in the stratum``
    (ties: train, val, test).

    Raises:
        ValueError: for bad fractions or when ``strata`` and ``groups`` differ in length.
    """
    fractions = _check_fractions(fractions)
    if len(strata) != len(groups):
        raise ValueError(f"strata ({len(strata)}) and groups ({len(groups)}) must have the same length")
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    group_stratum = {g: Counter(strata[i] for i in idx).most_common(1)[0][0] for g, idx in members.items()}
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for g in sorted(members):
        by_stratum[group_stratum[g]].append(g)
    rng = np.random.default_rng(seed)
    out = [""] * len(strata)
    for key in sorted(by_stratum):
        names = list(by_stratum[key])
        rng.shuffle(names)
        names.sort(key=lambda g: -len(members[g]))  # stable: the shuffle breaks ties
        total = sum(len(members[g]) for g in names)
        targets = [f * total for f in fractions]
        counts = [0] * len(SPLITS)
        for g in names:
            s = max(range(len(SPLITS)), key=lambda j: (targets[j] - counts[j], -j))
            counts[s] += len(members[g])
            for i in members[g]:
                out[i] = SPLITS[s]
    return out


def patient_group_key(record) -> str:
    """Centre, age, gender, bones and tumor type of a ``BtxrdRecord``: images
    sharing all five are most likely views of one patient (BTXRD publishes no
    patient id)."""
    age = "?" if record.age is None else str(record.age)
    return "|".join([record.center, age, record.gender, "+".join(record.bones), record.tumor_type])


def group_id(key: str) -> str:
    """A short stable id for a group key (the key itself holds age and gender,
    which the split files need not repeat)."""
    return "g" + hashlib.sha256(key.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- split files


@dataclass(frozen=True)
class SplitFile:
    path: Path
    sha256: str
    split: dict[str, str]  # image_id -> one of SPLITS
    group: dict[str, str]  # image_id -> group_id
    tumor_type: dict[str, str]  # image_id -> tumor type

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> str:
        """e.g. "btxrd-256-grouped-v1.csv (sha256 3f2a9c01d4e5)"."""
        return f"{self.name} (sha256 {self.sha256[:12]})"

    def ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return sorted(i for i, s in self.split.items() if s == split)


def split_rows(records, kind: str, fractions: Sequence[float] = THESIS_FRACTIONS, seed: int = 0) -> list[dict]:
    """One CSV row per record (sorted by image id) for a ``thesis`` or ``grouped`` split."""
    strata = [r.stratum for r in records]
    gids = [group_id(patient_group_key(r)) for r in records]
    if kind == "thesis":
        assigned = thesis_split(strata, fractions, seed)
    elif kind == "grouped":
        assigned = grouped_split(strata, gids, fractions, seed)
    else:
        raise ValueError(f"split kind must be 'thesis' or 'grouped', got {kind!r}")
    rows = [{"image_id": r.image_id, "split": s, "group_id": g, "tumor_type": r.tumor_type}
            for r, s, g in zip(records, assigned, gids)]
    return sorted(rows, key=lambda row: row["image_id"])


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SPLIT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_split_csv(path: str | Path, rows: list[dict], overwrite: bool = False) -> bool:
    """Write ``rows``; returns True if the file was written, False if it already
    held exactly these rows.

    Raises:
        FileExistsError: when ``path`` holds a different split and ``overwrite`` is False.
    """
    path = Path(path)
    text = csv_text(rows)
    if path.is_file():
        if path.read_text() == text:
            return False
        if not overwrite:
            raise FileExistsError(f"{path} exists with a different split; give a new --version (or --overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


def read_split_csv(path: str | Path) -> SplitFile:
    """Read a split file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, an unknown split name or a repeated image id.
    """
    path = Path(path)
    raw = path.read_bytes()
    reader = csv.DictReader(io.StringIO(raw.decode()))
    missing = [c for c in ("image_id", "split") if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{path} lacks columns {missing} (expected {', '.join(SPLIT_COLUMNS)})")
    split, group, ttype = {}, {}, {}
    for line, row in enumerate(reader, start=2):
        image_id = Path(row["image_id"].strip()).stem  # "IMG000001.jpeg" and "IMG000001" both work
        name = row["split"].strip()
        if name not in SPLITS:
            raise ValueError(f"{path}:{line}: split {name!r} is not one of {SPLITS}")
        if image_id in split:
            raise ValueError(f"{path}:{line}: image {image_id} appears twice")
        split[image_id] = name
        group[image_id] = (row.get("group_id") or "").strip() or image_id
        ttype[image_id] = (row.get("tumor_type") or "").strip()
    return SplitFile(path=path, sha256=hashlib.sha256(raw).hexdigest(), split=split, group=group, tumor_type=ttype)


def assign(records, split_file: SplitFile) -> tuple[dict[str, list], list[tuple[str, str]]]:
    """Records per split name, and problems: (image_id, reason) for usable
    images the file does not list and for listed images not among the records
    (a different data version, or images the reader set aside)."""
    out: dict[str, list] = {name: [] for name in SPLITS}
    problems = []
    seen = set()
    for r in records:
        name = split_file.split.get(r.image_id)
        if name is None:
            problems.append((r.image_id, f"not in split file {split_file.name}: left out"))
            continue
        seen.add(r.image_id)
        out[name].append(r)
    for image_id in sorted(set(split_file.split) - seen):
        problems.append((image_id, f"in split file {split_file.name} but not a usable image of the data"))
    return out, problems


def straddling_groups(rows: list[dict]) -> tuple[int, int]:
    """(groups with images in more than one split, groups with more than one image)."""
    splits_of: dict[str, set] = defaultdict(set)
    sizes: Counter = Counter()
    for row in rows:
        splits_of[row["group_id"]].add(row["split"])
        sizes[row["group_id"]] += 1
    multi = [g for g, n in sizes.items() if n > 1]
    return sum(len(splits_of[g]) > 1 for g in multi), len(multi)


def describe_split(rows: list[dict]) -> str:
    """A table of image counts per tumor type and split, and the group straddle count."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        counts[row["tumor_type"]][row["split"]] += 1
        counts["all"][row["split"]] += 1
    width = max(len(k) for k in counts)
    lines = [f"  {'tumor type':<{width}}  " + "  ".join(f"{s:>11}" for s in SPLITS)]
    for key in sorted(counts, key=lambda k: (k == "all", -sum(counts[k].values()), k)):
        n = sum(counts[key].values())
        cells = [f"{counts[key][s]:5d} ({counts[key][s] / n:4.0%})" for s in SPLITS]
        lines.append(f"  {key:<{width}}  " + "  ".join(cells))
    straddle, multi = straddling_groups(rows)
    lines.append(f"  likely-patient groups with more than one image: {multi}; straddling two or more splits: {straddle}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from training.btxrd import read_btxrd

    p = argparse.ArgumentParser(prog="python -m training.split",
                                description="Write the thesis split and the grouped split of a BTXRD-layout folder to CSV.")
    p.add_argument("data", help="folder in BTXRD's layout")
    p.add_argument("--name", required=True, help="data name used in the file names, e.g. btxrd-256")
    p.add_argument("--version", type=int, default=1, help="version number in the file names")
    p.add_argument("--kind", choices=("thesis", "grouped", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", default=",".join(map(str, THESIS_FRACTIONS)), help="train,val,test")
    p.add_argument("--out-dir", default=str(SPLITS_DIR))
    p.add_argument("--overwrite", action="store_true", help="replace an existing file that differs (prefer a new --version)")
    args = p.parse_args(argv)
    try:
        fractions = _check_fractions([float(x) for x in args.fractions.split(",")])
    except ValueError as exc:
        p.error(str(exc))
    dataset = read_btxrd(args.data)
    if dataset.problems:
        print(f"{len(dataset.problems)} data problems (python -m training.btxrd {args.data} --problems); "
              "images set aside by the reader are not in the split")
    kinds = ("thesis", "grouped") if args.kind == "both" else (args.kind,)
    for kind in kinds:
        rows = split_rows(dataset.records, kind, fractions, args.seed)
        path = Path(args.out_dir) / f"{args.name}-{kind}-v{args.version}.csv"
        written = write_split_csv(path, rows, overwrite=args.overwrite)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        print(f"{path} ({'written' if written else 'unchanged'}, sha256 {sha}): {kind} split, seed {args.seed}, "
              f"fractions {'/'.join(f'{f:g}' for f in fractions)}, {len(rows)} images")
        print(describe_split(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
