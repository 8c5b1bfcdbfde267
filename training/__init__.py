"""Training side of Bone Detect: everything that makes a checkpoint.

- ``training.btxrd``: reader for BTXRD's published layout (real or synthetic).
- ``training.synthetic``: synthetic radiographs in that layout.
- ``training.split``: seeded train/validation splits.
- ``training.losses``: Dice + Focal loss on logits.
- ``training.train``: the training and evaluation command.

Imports only ``model`` (never ``db``, ``worker`` or ``api``).
"""
