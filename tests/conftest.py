"""Settings shared by every test.

The tests run the synthetic demo model (model/checkpoints/synthetic-demo.pt):
they check masks against lesions that training.synthetic drew, and CI has no
real data. The shipped default, the BTXRD-trained model, has its own tests
(tests/unit/test_checkpoint_inference.py). Worker processes started by a test
inherit this environment; a test that wants another model sets
MODEL_CHECKPOINT itself (monkeypatch.setenv). Set, not defaulted: a
MODEL_CHECKPOINT exported in the shell must not change what the tests run.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["MODEL_CHECKPOINT"] = str(Path(__file__).resolve().parents[1] / "model" / "checkpoints" / "synthetic-demo.pt")
