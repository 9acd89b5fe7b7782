"""Whole-volume sliding-window inference, accumulated on the model's device (or on the CPU
where the device cannot hold the whole probability map).

Patch locations are the grid of TorchIO's ``GridSampler`` (:func:`grid_locations`, tested
equal to it; the same grid as its ``GridAggregator``);
patches are cut from the image tensor already on the device and blended there, so no
per-patch host round trip happens (TorchIO's own aggregator accumulates on the CPU). Blending
weights: ``hann`` (TorchIO's window), ``gaussian`` (σ = patch / 8 as nnU-Net, each axis floored at
1e-3 of its peak so border voxels keep some weight; nnU-Net and MONAI floor differently) or
``constant``.
Probabilities, not logits, are blended (softmax per patch first), so the blended map stays a
probability map whose soft volume is meaningful.

Accumulation (``accumulate``): the blended map ``(C, W, H, D)`` and its weights stay on the
device (``device``), or are summed on the CPU, each batch of patches copied there (``cpu``:
nnU-Net's fallback; a CT of 512×512×300 with 3 classes needs about 1.3 GB for them).
``auto`` (the default) keeps them on the device unless they would take more than half of the
device memory free at the first batch, or their allocation runs out of memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from biasseg.errors import InputError

WEIGHTINGS = ("hann", "gaussian", "constant")
ACCUMULATIONS = ("auto", "device", "cpu")
DEVICE_SHARE = 0.5  # accumulate=auto: the map and its weights may take this share of the free device memory


def blending_window(patch_size: Sequence[int], weighting: str, device: torch.device) -> torch.Tensor:
    """Separable blending weights of shape ``patch_size``, all > 0."""
    if weighting not in WEIGHTINGS:
        raise InputError(f"sliding-window weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    window = torch.ones((), device=device)
    for size in patch_size:
        if weighting == "hann":
            w = torch.hann_window(size + 2, periodic=False, device=device)[1:-1]
        elif weighting == "gaussian":
            x = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
            w = torch.exp(-0.5 * (x / (size / 8)) ** 2)
            w = torch.clamp(w / w.max(), min=1e-3)
        else:
            w = torch.ones(size, device=device)
        window = window.unsqueeze(-1) * w
    return window.float()


def grid_overlap(patch_size: Sequence[int], fraction: float) -> tuple[int, int, int]:
    """Even overlap in voxels (TorchIO's GridSampler needs even values) per axis."""
    return tuple(int(p * fraction) // 2 * 2 for p in patch_size)


def grid_locations(shape: Sequence[int], patch_size: Sequence[int], overlap: Sequence[int]) -> np.ndarray:
    """Patch corners ``(N, 6)`` as ``[i0, j0, k0, i1, j1, k1]``, sorted: the grid of TorchIO's
    ``GridSampler`` (tested equal to its patches' locations) — along each axis a step of
    ``patch − overlap`` from 0, plus a last patch flush with the end."""
    starts = []
    for size, patch, lap in zip(shape, patch_size, overlap):
        axis = list(range(0, size - patch + 1, patch - lap))
        if axis[-1] != size - patch:
            axis.append(size - patch)
        starts.append(axis)
    origins = np.array(np.meshgrid(*starts, indexing="ij")).reshape(3, -1).T
    return np.array(sorted(np.hstack([origins, origins + np.asarray(patch_size)]).tolist()))


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` (0, 1, 2 = W, H, D) as tensor dims of a ``(B, C, W,
    H, D)`` batch, the empty one (no flip) first."""
    dims = [int(a) + 2 for a in axes]
    return [tuple(d for i, d in enumerate(dims) if mask >> i & 1) for mask in range(2 ** len(dims))]


@torch.no_grad()
def sliding_window_probabilities(
    image: torch.Tensor,
    predict: Callable[[torch.Tensor], torch.Tensor],
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    weighting: str = "hann",
    activation: str = "softmax",
    mirror_axes: Sequence[int] = (),
    accumulate: str = "auto",
) -> torch.Tensor:
    """Class probabilities ``(C, W, H, D)`` for a whole image ``(channels, W, H, D)``.

    ``predict`` maps a batch of patches ``(B, channels, *patch_size)`` to logits
    ``(B, C, *patch_size)``. Images smaller than a patch are zero-padded, the output cropped
    back. Everything stays on ``image``'s device. ``activation``: ``softmax`` over the classes,
    or ``sigmoid`` per channel (region outputs). ``mirror_axes`` (of ``W, H, D``): each patch's
    probabilities are the mean over every flip of those axes (test-time mirroring, nnU-Net's
    ``use_mirroring``; 2^k forward passes). ``accumulate``: where the map is summed (module
    docstring); the result lies there, on the CPU after a fallback.
    """
    patch_size = tuple(int(p) for p in patch_size)
    shape = image.shape[1:]
    missing = [max(p - s, 0) for p, s in zip(patch_size, shape)]
    if any(missing):
        pad = []
        for m in reversed(missing):  # F.pad takes the last axis first
            pad += [m // 2, m - m // 2]
        image = F.pad(image, pad)
    padded_shape = image.shape[1:]
    locations = grid_locations(tuple(padded_shape), patch_size, grid_overlap(patch_size, overlap))
    window = blending_window(patch_size, weighting, image.device)
    output: torch.Tensor | None = None
    weights = summed_window = torch.empty(0)
    for start in range(0, len(locations), batch_size):
        chunk = locations[start : start + batch_size]
        patches = torch.stack([image[:, i0:i1, j0:j1, k0:k1] for i0, j0, k0, i1, j1, k1 in chunk])
        probabilities = None
        for flip in mirror_combinations(mirror_axes):  # the identity first
            logits = predict(patches.flip(flip) if flip else patches).float()
            mirrored = torch.softmax(logits, dim=1) if activation == "softmax" else torch.sigmoid(logits)
            mirrored = mirrored.flip(flip) if flip else mirrored
            probabilities = mirrored if probabilities is None else probabilities + mirrored
        probabilities = probabilities / (2 ** len(mirror_axes))
        if output is None:
            output, weights = accumulators(probabilities.shape[1], tuple(padded_shape), image.device, accumulate)
            summed_window = window.to(output.device)  # blending stays on the device; the sums may not
        blended = (probabilities * window).to(output.device)
        for p, (i0, j0, k0, i1, j1, k1) in zip(blended, chunk):
            output[:, i0:i1, j0:j1, k0:k1] += p
            weights[i0:i1, j0:j1, k0:k1] += summed_window
    assert output is not None
    output /= weights
    if any(missing):
        before = np.array(missing) // 2
        output = output[
            :,
            before[0] : before[0] + shape[0],
            before[1] : before[1] + shape[1],
            before[2] : before[2] + shape[2],
        ]
    return output


def accumulators(classes: int, shape: tuple[int, ...], device: torch.device, accumulate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed map ``(classes, *shape)`` and weights ``shape`` (float32), on ``device`` or on
    the CPU as ``accumulate`` says (module docstring)."""
    if accumulate not in ACCUMULATIONS:
        raise InputError(f"sliding-window accumulate must be one of {ACCUMULATIONS}, got {accumulate!r}")
    cpu = torch.device("cpu")
    if device.type == "cpu" or accumulate == "cpu":
        return torch.zeros(classes, *shape, device=cpu), torch.zeros(shape, device=cpu)
    if accumulate == "auto" and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the allocator's cache is free to us
        if 4 * (classes + 1) * math.prod(shape) > DEVICE_SHARE * free:
            return accumulators(classes, shape, device, "cpu")
    try:
        return torch.zeros(classes, *shape, device=device), torch.zeros(shape, device=device)
    except torch.OutOfMemoryError:
        if accumulate == "device":
            raise
        return accumulators(classes, shape, device, "cpu")


@dataclass(frozen=True)
class SlidingWindow:
    """Sliding-window settings; call with an image ``(channels, W, H, D)`` and a predictor."""

    patch_size: tuple[int, int, int]
    overlap: float = 0.5
    batch_size: int = 2
    weighting: str = "hann"
    mirror_axes: tuple[int, ...] = ()
    accumulate: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mirror_axes", tuple(int(a) for a in self.mirror_axes))
        if self.weighting not in WEIGHTINGS:
            raise InputError(f"sliding-window weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"sliding-window overlap must be in [0, 1), got {self.overlap}")
        if self.accumulate not in ACCUMULATIONS:
            raise InputError(f"sliding-window accumulate (data.val_accumulate; accumulate= of predict.py) must be one of "
                             f"{ACCUMULATIONS}, got {self.accumulate!r}")

    def __call__(self, image: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor], activation: str = "softmax") -> torch.Tensor:
        return sliding_window_probabilities(
            image, predict, self.patch_size, self.overlap, self.batch_size, self.weighting, activation, self.mirror_axes,
            self.accumulate,
        )
