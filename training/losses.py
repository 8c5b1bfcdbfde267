"""Dice + Focal loss on logits (the thesis trains its attention U-Net with Dice + Focal).

Both terms take raw logits ``(N, 1, H, W)`` and a {0, 1} target of the same
shape; the sigmoid is applied here, never in the network.

- Soft Dice, pooled over the whole batch (one ratio for all pixels of all
  images): images without a tumor add to the denominator through their false
  positives and never divide by zero. ``smooth`` keeps the gradient finite
  when the batch holds no tumor at all. With ``per_image`` it is one ratio
  per image, averaged: every image weighs the same, so a missed small lesion
  costs as much as a missed large one (pooled, it costs its few pixels).
- Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017):
  binary cross-entropy scaled by ``(1 - p_t) ** gamma`` so the many easy
  background pixels count little; ``alpha`` (optional) weighs the positives.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, per_image: bool = False) -> torch.Tensor:
    """1 - (2 |P.T| + smooth) / (|P| + |T| + smooth), P = sigmoid(logits), pooled over the batch,
    or with ``per_image`` that ratio for each image (first axis), averaged."""
    prob = torch.sigmoid(logits.float())
    target = target.float()
    dims = tuple(range(1, prob.dim())) if per_image else tuple(range(prob.dim()))
    intersection = (prob * target).sum(dims)
    total = prob.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * intersection + smooth) / (total + smooth)).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None) -> torch.Tensor:
    """Mean over pixels of ``-alpha_t (1 - p_t) ** gamma log(p_t)``; gamma 0 and alpha None give plain BCE."""
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # -log(p_t)
    p_t = torch.exp(-bce)
    loss = (1.0 - p_t) ** gamma * bce
    if alpha is not None:
        loss = (alpha * target + (1.0 - alpha) * (1.0 - target)) * loss
    return loss.mean()


class DiceFocalLoss(nn.Module):
    """``dice_weight * soft_dice_loss + focal_weight * focal_loss``.

    Args:
        dice_weight: weight of the soft Dice term (>= 0).
        focal_weight: weight of the focal term (>= 0); the two may not both be 0.
        gamma: focal exponent (>= 0); 2 as in Lin et al.
        alpha: focal weight of the positive class in [0, 1], or None for none.
        smooth: Dice smoothing constant (> 0).
        per_image: the Dice term per image, averaged, instead of pooled over the batch.
    """

    def __init__(self, dice_weight: float = 1.0, focal_weight: float = 1.0, gamma: float = 2.0,
                 alpha: float | None = None, smooth: float = 1.0, per_image: bool = False):
        super().__init__()
        if dice_weight < 0 or focal_weight < 0 or dice_weight + focal_weight == 0:
            raise ValueError(f"weights must be >= 0 and not both 0, got dice={dice_weight}, focal={focal_weight}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.dice_weight, self.focal_weight = float(dice_weight), float(focal_weight)
        self.gamma, self.alpha, self.smooth = float(gamma), alpha, float(smooth)
        self.per_image = bool(per_image)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, self.smooth, self.per_image)
        if self.focal_weight:
            loss = loss + self.focal_weight * focal_loss(logits, target, self.gamma, self.alpha)
        return loss
