"""Self-describing checkpoints: loading needs nothing but the file.

A checkpoint is a ``torch.save`` of one dict of plain types and tensors::

    {
        "format": "bonedetect-checkpoint/1",  # /3 when "postprocessing_tta" is present
        "version": str,            # recorded in every result row
        "label": str,              # e.g. "synthetic, not for clinical use"
        "network_config": dict,    # UNetConfig as a dict (filters as a list)
        "state_dict": dict,        # weights; floating tensors in fp16 when saved with half=True
        "preprocessing": dict,     # Preprocessor.as_dict(): size, mean, std
        "postprocessing": dict,    # Postprocessor.as_dict(): threshold, ...
        "postprocessing_tta": dict,  # optional: TTA mode ("flip", "flip4") -> the same, chosen for that mode
                                     # (INFER_TTA); a mode not in it uses "postprocessing"
        "tta": str,                # optional: the TTA mode it was validated to be served with (INFER_TTA=auto); absent: off
        "metrics": dict,           # what the checkpoint earned, and on which data
        "extra": dict,             # training config, data license, ...
        "created_at": str,         # ISO 8601, UTC
    }

``load_checkpoint`` reads it with ``torch.load(weights_only=True)``, which
unpickles no arbitrary objects; that is why everything stored is converted to
plain types (tuples become lists, Paths strings, dataclasses dicts) when saved.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from model.network import AttentionUNet, UNetConfig
from model.postprocess import Postprocessor
from model.preprocess import Preprocessor

FORMAT = "bonedetect-checkpoint/1"
# A file with "postprocessing_tta" (TTA mode -> postprocessing) is written as /3, so that code from before it
# refuses the file loudly instead of serving TTA at the plain threshold under the new file's version. /2 (written
# for a few hours on 2026-11-28, never shipped) held one flat postprocessing for flip TTA; it is read as {"flip": ...}.
FORMAT_FLIP_ONLY = "bonedetect-checkpoint/2"
FORMAT_TTA = "bonedetect-checkpoint/3"
FORMATS = (FORMAT, FORMAT_FLIP_ONLY, FORMAT_TTA)
CHECKPOINTS = Path(__file__).parent / "checkpoints"
# Trained on real radiographs (BTXRD-256; CC BY-NC-ND 4.0, non-commercial): what the demo and workers load by default.
BTXRD_CHECKPOINT = CHECKPOINTS / "btxrd-256.pt"
# Trained on training.synthetic's images only: the tests' model (it finds the lesions the generator draws).
SYNTHETIC_CHECKPOINT = CHECKPOINTS / "synthetic-demo.pt"
DEFAULT_CHECKPOINT = BTXRD_CHECKPOINT
_INFO_KEYS = ("format", "created_at", "network_config")  # copied into LoadedModel.info next to extra
_LOADED_KEYS = (*_INFO_KEYS, "stored_half")  # every key loading adds to the saved extra in LoadedModel.info


@dataclass
class LoadedModel:
    network: AttentionUNet  # eval mode, float32
    preprocessor: Preprocessor
    postprocessor: Postprocessor
    version: str  # recorded in every result row
    label: str  # e.g. "synthetic, not for clinical use"
    metrics: dict
    info: dict  # the saved ``extra`` (training config, data license ...) plus format, created_at, network_config
    # TTA mode -> the postprocessing chosen on validation for it (averaged probabilities are smoother, so their
    # best threshold differs); a mode not in it uses ``postprocessor``
    postprocessors_tta: dict[str, Postprocessor] = dataclasses.field(default_factory=dict)
    # the TTA mode workers with INFER_TTA=auto (the default) serve it with
    recommended_tta: str = "off"

    def postprocessor_for(self, mode: str) -> Postprocessor:
        """The postprocessing for TTA ``mode``: its own when chosen apart, else the plain one."""
        return self.postprocessors_tta.get(mode, self.postprocessor)


def _plain(obj, where: str):
    """Convert ``obj`` to types that ``torch.load(weights_only=True)`` accepts."""
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    for kind in (int, float, str):  # subclasses (torch.__version__, IntEnum, ...) are not plain
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{where}: dict keys must be strings, got {bad[0]!r}")
        return {k: _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise ValueError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint; use plain types")


def saved_extra(loaded: LoadedModel) -> dict:
    """The ``extra`` a checkpoint was saved with (``LoadedModel.info`` less what loading adds): what a copy of
    it passes to ``save_checkpoint`` again."""
    return {k: v for k, v in loaded.info.items() if k not in _LOADED_KEYS}


def save_checkpoint(
    path,
    network: AttentionUNet,
    *,
    preprocessor: Preprocessor,
    postprocessor: Postprocessor,
    version: str,
    label: str,
    metrics: dict | None = None,
    extra: dict | None = None,
    half: bool = False,
    postprocessors_tta: dict[str, Postprocessor] | None = None,
    recommended_tta: str = "off",
) -> Path:
    """Write a checkpoint (module docstring: contents) atomically; returns its path.

    Args:
        network: the trained network (a ``torch.compile`` wrapper is unwrapped).
        half: store floating weights as fp16 (half the file); they are
            restored to float32 on load.
        postprocessors_tta: TTA mode -> its postprocessing, for the modes whose
            threshold was chosen apart (``LoadedModel.postprocessors_tta``).
        recommended_tta: the TTA mode to serve with under INFER_TTA=auto; a
            mode other than "off" needs its own entry in ``postprocessors_tta``
            (its threshold chosen for it).
    """
    if not isinstance(version, str) or not version:
        raise ValueError(f"version must be a non-empty string, got {version!r}")
    extra = _plain(extra or {}, "extra")
    clash = [k for k in _LOADED_KEYS if k in extra]  # what loading adds (saved_extra drops them)
    if clash:
        raise ValueError(f"extra must not use the reserved key {clash[0]!r}")
    if recommended_tta != "off" and recommended_tta not in (postprocessors_tta or {}):
        raise ValueError(f"recommended_tta {recommended_tta!r} has no threshold of its own in postprocessors_tta")
    network = getattr(network, "_orig_mod", network)
    state = {}
    for name, tensor in network.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        state[name] = tensor.half() if half and tensor.is_floating_point() else tensor
    payload = {
        "format": FORMAT_TTA if postprocessors_tta else FORMAT,
        "version": version,
        "label": str(label),
        "network_config": _plain(dataclasses.asdict(network.config), "network_config"),
        "state_dict": state,
        "preprocessing": preprocessor.as_dict(),
        "postprocessing": postprocessor.as_dict(),
        **({"postprocessing_tta": {str(m): p.as_dict() for m, p in postprocessors_tta.items()}} if postprocessors_tta else {}),
        **({"tta": str(recommended_tta)} if recommended_tta != "off" else {}),
        "metrics": _plain(metrics or {}, "metrics"),
        "extra": extra,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # readers never see a half-written file
    return path


def load_checkpoint(path, map_location="cpu") -> LoadedModel:
    """Read a checkpoint written by ``save_checkpoint``; the network comes back
    in eval mode, in float32, on ``map_location``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a bonedetect checkpoint (or not this format version).
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # unpickling errors of all kinds: not ours
        raise ValueError(f"{path} is not a bonedetect checkpoint: {exc}") from exc
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    if found not in FORMATS:
        raise ValueError(f"{path} is not a bonedetect checkpoint: format {found!r}, expected one of {FORMATS}")
    try:
        config = UNetConfig(**data["network_config"])
        network = AttentionUNet(config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in data["state_dict"].items()}
        network.load_state_dict(state)
        preprocessor = Preprocessor(**data["preprocessing"])
        postprocessor = Postprocessor(**data["postprocessing"])
        by_mode = data.get("postprocessing_tta") or {}
        if found == FORMAT_FLIP_ONLY:  # one flat postprocessing, for flip TTA
            by_mode = {"flip": by_mode}
        postprocessors_tta = {m: Postprocessor(**d) for m, d in by_mode.items()}
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path}: damaged bonedetect checkpoint: {exc}") from exc
    network.to(map_location).eval()
    info = {**data.get("extra", {}), **{k: data.get(k) for k in _INFO_KEYS}}
    info["stored_half"] = any(v.dtype == torch.float16 for v in data["state_dict"].values())  # saved with half=True
    return LoadedModel(
        network=network,
        preprocessor=preprocessor,
        postprocessor=postprocessor,
        version=data["version"],
        label=data.get("label", ""),
        metrics=data.get("metrics", {}),
        info=info,
        postprocessors_tta=postprocessors_tta,
        recommended_tta=data.get("tta") or "off",
    )
