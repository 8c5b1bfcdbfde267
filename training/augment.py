"""Batched augmentation of image and mask together, in torch, on the training device.

One affine warp per image (flips, rotation, zoom) is applied with
``grid_sample`` to the image (bilinear), the mask and the image's footprint
(nearest), then brightness and contrast change the image inside its
footprint only: the black padding around an image stays exactly 0 (unit
float) as serving produces it. Random draws come from a CPU
``torch.Generator`` (tiny tensors), so a seed gives the same augmentations on
CPU and GPU, and the generator's state can be saved for resuming.

The thesis lists "flip, rotation, zoom, brightness/contrast" without
amounts; ``AugmentConfig``'s defaults are ours (the usual Keras-style ranges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    hflip: float = 0.5  # probability of a left-right flip
    vflip: float = 0.5  # probability of an up-down flip (BTXRD has limbs in every orientation)
    rotation: float = 15.0  # degrees, uniform in [-x, x]
    zoom: float = 0.1  # scale uniform (log) in [1 - x, 1 + x]; > 1 zooms in
    brightness: float = 0.1  # added to unit-float pixels, uniform in [-x, x]
    contrast: float = 0.1  # factor around the image's mean, uniform in [1 - x, 1 + x]

    def __post_init__(self):
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        for name in ("rotation", "brightness"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("zoom", "contrast"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def affine_params(n: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) float64 matrices for ``F.affine_grid`` (output -> input coordinates)."""
    sx = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < cfg.hflip, -1.0, 1.0)
    sy = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < cfg.vflip, -1.0, 1.0)
    angle = _uniform(n, -cfg.rotation, cfg.rotation, gen) * (math.pi / 180.0)
    scale = torch.exp(_uniform(n, math.log(1.0 - cfg.zoom), math.log(1.0 + cfg.zoom), gen))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
    return theta


def augment_batch(images: torch.Tensor, masks: torch.Tensor, inside: torch.Tensor, cfg: AugmentConfig,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch.

    Args:
        images: (N, 1, S, S) unit-float frames (padding 0).
        masks: (N, 1, S, S) {0, 1}, any dtype.
        inside: (N, 1, S, S) {0, 1}: 1 on image pixels, 0 on padding.
        gen: CPU generator, the only source of randomness.

    Returns:
        (images, masks) as float32 on the input's device; masks stay {0, 1}.
    """
    n, device = images.shape[0], images.device
    theta = affine_params(n, cfg, gen).to(device=device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(inside.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    contrast = _uniform(n, 1.0 - cfg.contrast, 1.0 + cfg.contrast, gen).float().to(device).view(n, 1, 1, 1)
    brightness = _uniform(n, -cfg.brightness, cfg.brightness, gen).float().to(device).view(n, 1, 1, 1)
    area = inside.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
    mean = (images * inside).sum(dim=(1, 2, 3), keepdim=True) / area
    images = ((images - mean) * contrast + mean + brightness).clamp(0.0, 1.0) * inside
    return images, masks
