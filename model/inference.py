"""Batched inference: gray radiographs of any size -> probability maps and masks
at the original size.

The same ``Preprocessor`` and ``Postprocessor`` as training's evaluation, so
what was measured is what runs. On CUDA the network runs under bf16 autocast
with channels_last weights (about 4x the fp32 batch-1 throughput on an H100,
see DESIGN.md); on CPU in fp32. Thread counts are the caller's business
(``torch.set_num_threads``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from model.checkpoint import LoadedModel


@dataclass
class Prediction:
    prob: np.ndarray  # (orig_h, orig_w) float32 probability at the original size
    mask: np.ndarray  # (orig_h, orig_w) uint8 {0, 1} after postprocessing


class Segmenter:
    """Runs a loaded checkpoint over lists of images in batches.

    Args:
        loaded: from ``load_checkpoint``; its network is moved to ``device``
            (once, here) and used in place.
        device: "cuda", "cpu", ...; None picks "cuda" when available.
        batch_size: images per forward pass.
        compile_network: wrap the network in ``torch.compile`` (CUDA workers;
            the first batch then takes a while).
    """

    def __init__(self, loaded: LoadedModel, device: str | None = None, batch_size: int = 16, compile_network: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        config = loaded.network.config
        if config.in_channels != 1 or config.out_channels != 1:
            raise ValueError(f"Segmenter needs a 1-in, 1-out network, got {config.in_channels} in, {config.out_channels} out")
        if loaded.preprocessor.size % config.multiple:
            raise ValueError(f"preprocessing size {loaded.preprocessor.size} is not divisible by {config.multiple}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        network = loaded.network.to(self.device).eval()
        if self.cuda:
            network = network.to(memory_format=torch.channels_last)
        self.network = torch.compile(network) if compile_network else network
        self.preprocessor, self.postprocessor = loaded.preprocessor, loaded.postprocessor
        self.batch_size = batch_size
        self.version, self.label = loaded.version, loaded.label

    def predict_batch_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) preprocessed frames -> (N, 1, S, S) float32 probabilities, on ``self.device``."""
        with torch.inference_mode():
            x = x.to(self.device, dtype=torch.float32, non_blocking=True)
            if self.cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
            with autocast:
                logits = self.network(x)
            return torch.sigmoid(logits.float())

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Gray (H, W) images, any size and dtype -> one Prediction each, in order."""
        results = []
        for start in range(0, len(images), self.batch_size):
            prepared = [self.preprocessor(image) for image in images[start : start + self.batch_size]]
            x = torch.from_numpy(np.stack([frame for frame, _ in prepared])[:, None])  # (n, 1, S, S)
            if self.cuda:
                x = x.pin_memory()
            probs = self.predict_batch_tensor(x)[:, 0].cpu().numpy()  # (n, S, S)
            for plane, (_, geometry) in zip(probs, prepared):
                prob = geometry.restore(plane)  # (orig_h, orig_w)
                results.append(Prediction(prob=prob, mask=self.postprocessor(prob)))
        return results

    def warmup(self, batch_size: int | None = None) -> None:
        """One forward pass on zeros, so the first real chunk does not pay for
        CUDA context, cuDNN autotuning or compilation."""
        size = self.preprocessor.size
        self.predict_batch_tensor(torch.zeros(batch_size or self.batch_size, 1, size, size))
        if self.cuda:
            torch.cuda.synchronize(self.device)
