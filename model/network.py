"""Attention U-Net for bone tumor segmentation on radiographs.

The reference method (a 2025 thesis, "SegUNet" on BTXRD) is a U-Net whose skip
connections pass through additive attention gates:

- O. Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas",
  MIDL 2018, arXiv:1804.03999.
- S. Yao et al., "A Radiograph Dataset for the Classification, Localization,
  and Segmentation of Primary Bone Tumors", Scientific Data 12:88, 2025
  (BTXRD, the data the thesis trains and tests on).

Layout with the default ``filters=(32, 64, 128, 256, 512)`` (7,850,713
parameters, the seed model's "7.85 M")::

    x (N,1,H,W) -> enc 32 -> pool -> enc 64 -> pool -> enc 128 -> pool -> enc 256 -> pool -> bottleneck 512
                      |               |                 |                  |                     |
                     gate            gate              gate               gate             up 2x2, s2
                      '-> dec 32 <- up <- dec 64 <- up <- dec 128 <- up <- dec 256 <-------------'
                          |
                        1x1 conv -> logits (N,1,H,W)

Read top to bottom: the config, the conv block, the attention gate, the network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass
class UNetConfig:
    in_channels: int = 1  # gray radiographs
    out_channels: int = 1  # one tumor-vs-background logit per pixel
    filters: tuple[int, ...] = (32, 64, 128, 256, 512)  # encoder widths per level; the last is the bottleneck
    dropout: float = 0.3  # the thesis's value; applied at the end of every conv block (see ConvBlock)

    def __post_init__(self):
        for name in ("in_channels", "out_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        filters = tuple(self.filters) if isinstance(self.filters, (list, tuple)) else None
        if (
            filters is None
            or len(filters) < 2
            or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in filters)
        ):
            raise ValueError(f"filters must be at least two positive ints (encoder widths, last = bottleneck), got {self.filters!r}")
        self.filters = filters  # lists (e.g. from a checkpoint) become a tuple
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")

    @property
    def multiple(self) -> int:
        """H and W of an input must be divisible by this (one 2x2 pooling per level)."""
        return 2 ** (len(self.filters) - 1)


class ConvBlock(nn.Module):
    """Two (3x3 conv -> BatchNorm -> ReLU), then dropout.

    The thesis lists "BN, ReLU, dropout 0.3" as its block recipe, so every block
    (encoder, bottleneck and decoder) ends with element-wise dropout; it is
    active only in training mode. The convolutions have no bias: BatchNorm's
    shift makes one redundant.
    """

    def __init__(self, in_ch: int, out_ch: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )

    def forward(self, x):
        return self.body(x)


class AttentionGate(nn.Module):
    """Additive attention gate of Oktay et al. 2018 (their Eq. 1-2, Fig. 2).

    ``alpha = sigmoid(psi(relu(W_x x + W_g g)))`` and the gate returns
    ``x * alpha``: skip features ``x`` are kept where the gating signal ``g``
    from the decoder says the region is relevant. Each linear map is a 1x1
    conv followed by BatchNorm (which carries the biases b_g, b_psi of the
    paper). As in the usual 2-D form of the gate, ``g`` is the decoder feature
    already up-sampled to the skip's resolution, so no resampling of ``x`` or
    ``alpha`` is needed (the paper computes the gate at the coarser scale and
    resamples alpha).

    Args:
        gate_ch: channels of the gating signal ``g``.
        skip_ch: channels of the skip features ``x``.
        inter_ch: channels of the intermediate space (F_int in the paper).
    """

    def __init__(self, gate_ch: int, skip_ch: int, inter_ch: int):
        super().__init__()
        self.w_g = nn.Sequential(nn.Conv2d(gate_ch, inter_ch, 1, bias=False), nn.BatchNorm2d(inter_ch))
        self.w_x = nn.Sequential(nn.Conv2d(skip_ch, inter_ch, 1, bias=False), nn.BatchNorm2d(inter_ch))
        self.psi = nn.Sequential(nn.Conv2d(inter_ch, 1, 1, bias=False), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, x, g):
        alpha = self.psi(torch.relu(self.w_x(x) + self.w_g(g)))  # (N, 1, H, W) in [0, 1]
        return x * alpha  # (N, skip_ch, H, W)


class AttentionUNet(nn.Module):
    """U-Net with additive attention gates on every skip connection.

    Encoder: one ConvBlock per width in ``config.filters[:-1]``, each followed
    by 2x2 max pooling; the bottleneck is a ConvBlock of width
    ``config.filters[-1]``. Decoder, per level from deep to shallow: 2x2
    transposed conv with stride 2 (halves the channels, doubles H and W), an
    AttentionGate on the skip (F_int = half the skip's width) gated by the
    up-sampled features, concatenation, then a ConvBlock. A final 1x1 conv
    gives ``config.out_channels`` maps.

    ``forward`` returns logits. The thesis's "sigmoid output" is
    ``sigmoid(logits)``: the loss applies it (BCE-with-logits / soft Dice) and
    so do ``model.inference.Segmenter`` and the post-processing, which keeps
    the sigmoid out of the network and the loss numerically stable.

    Args:
        config: widths, channels and dropout; ``UNetConfig()`` (the thesis
            network) when None.

    Raises:
        ValueError: in ``forward``, when the input is not (N, in_channels, H, W)
            or H or W is not divisible by ``2 ** (len(filters) - 1)``.
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()
        *widths, deepest = config.filters
        ins = [config.in_channels, *widths[:-1]]
        self.encoder = nn.ModuleList(ConvBlock(i, o, config.dropout) for i, o in zip(ins, widths))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(widths[-1], deepest, config.dropout)
        # decoder levels, deepest first: (coarse width, skip width)
        levels = list(zip(config.filters[:0:-1], widths[::-1]))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c, s, 2, stride=2) for c, s in levels)
        self.gates = nn.ModuleList(AttentionGate(s, s, max(s // 2, 1)) for _, s in levels)
        self.decoder = nn.ModuleList(ConvBlock(2 * s, s, config.dropout) for _, s in levels)
        self.head = nn.Conv2d(widths[0], config.out_channels, 1)

    def forward(self, x):
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected input of shape (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % cfg.multiple or x.shape[3] % cfg.multiple:
            raise ValueError(f"H and W must be divisible by {cfg.multiple} for {len(cfg.filters)} levels, got {tuple(x.shape[2:])}")
        skips = []
        for block in self.encoder:
            x = block(x)  # (N, width, h, w)
            skips.append(x)
            x = self.pool(x)  # (N, width, h/2, w/2)
        x = self.bottleneck(x)  # (N, filters[-1], H/m, W/m)
        for up, gate, block, skip in zip(self.ups, self.gates, self.decoder, reversed(skips)):
            x = up(x)  # (N, skip width, h, w)
            x = block(torch.cat([gate(skip, x), x], dim=1))  # (2 * width) -> (N, width, h, w)
        return self.head(x)  # (N, out_channels, H, W) logits


def fold_batchnorm(network: nn.Module) -> nn.Module:
    """An inference copy of ``network`` with every BatchNorm that follows a
    convolution folded into it (the ``network`` itself is left as it is).

    In eval mode BatchNorm is an affine map per channel, so conv -> BN equals
    one conv whose weights are scaled and whose bias is shifted by it
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``); each BN becomes an
    ``nn.Identity``. Every BatchNorm of this network follows a convolution in
    an ``nn.Sequential`` (the conv blocks and the attention gates' linear
    maps), so none is left. The outputs equal the unfolded network's to float
    rounding (tests: 1e-5 in float32), and a pass over every activation
    per BatchNorm is saved: the full-size network at 512 ran ~5% faster on
    a 2-core CPU (11-17% without ALLOCATOR=keep; docs/benchmarks.md). Under
    bf16 autocast the folded weights round differently (``Segmenter`` folds
    only in float32 by default). Serving only: the copy is in eval mode
    and cannot be trained or saved as the checkpoint's network (its layers
    differ)."""
    folded = copy.deepcopy(network).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module[i], module[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    return folded
