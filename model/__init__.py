"""Bone Detect's model: the attention U-Net, pre/postprocessing, statistics,
metrics, checkpoints and batched inference.

The main names are re-exported lazily, so ``import model.metrics`` (numpy and
OpenCV only) does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "UNetConfig": "network",
    "AttentionUNet": "network",
    "to_unit_float": "preprocess",
    "Geometry": "preprocess",
    "Preprocessor": "preprocess",
    "Postprocessor": "postprocess",
    "render_overlay": "postprocess",
    "TumorStats": "stats",
    "tumor_statistics": "stats",
    "LoadedModel": "checkpoint",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "DEFAULT_CHECKPOINT": "checkpoint",
    "Prediction": "inference",
    "Segmenter": "inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
