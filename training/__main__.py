"""``python -m training CMD ...``: one entry point for the training commands.

    python -m training synthetic --out DIR --n 300 --seed 0   # = python -m training.synthetic
    python -m training summary DIR                            # = python -m training.btxrd
    python -m training split DIR --name NAME                  # = python -m training.split
    python -m training train ...                              # = python -m training.train
    python -m training evaluate CHECKPOINT --data DIR ...     # = python -m training.evaluate
"""

from __future__ import annotations

import sys

COMMANDS = {"synthetic": "training.synthetic", "summary": "training.btxrd", "split": "training.split",
            "train": "training.train", "evaluate": "training.evaluate"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
