"""Training side of Bone Detect: everything that makes a checkpoint.

- ``training.btxrd``: reader for BTXRD's published layout (real or synthetic).
- ``training.synthetic``: synthetic radiographs in that layout.
- ``training.split``: the thesis split and the grouped (leakage-safe) split, as versioned CSVs
  (``training/splits/``).
- ``training.losses``: Dice + Focal loss on logits.
- ``training.augment``: batched augmentation of image and mask together.
- ``training.train``: the training command (``--config thesis|strong|demo``, resumable).
- ``training.evaluate``: Table 4.1 metrics, breakdowns, a Markdown report and an example sheet.
- ``training/gpu/run_btxrd.sh``: the prepared GPU run (docs/training.md).

Imports only ``model`` (never ``db``, ``worker`` or ``api``).
"""
