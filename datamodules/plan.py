"""A plan from the dataset's fingerprint, by nnU-Net v2's rules (Isensee et al., Nat. Methods 2021).

nnU-Net decides the preprocessing and the network's shape from a *fingerprint* of the
dataset: each case's spacing and its size after the non-zero crop, how much the crop
removes, and the channels' names. The rules below are nnunetv2 2.8's, cited by file and
function (paths under ``nnunetv2/``); ``tests/test_plan.py`` runs nnunetv2's own planner on
the same generated dataset and requires the same target spacing, pooling per axis and
normalisation schemes.

* **Target spacing** (``experiment_planning/experiment_planners/default_experiment_planner.py``,
  ``ExperimentPlanner.determine_fullres_target_spacing``): the per-axis median of the cases'
  spacings; but when the coarsest axis is more than ``ANISO_THRESHOLD`` (3, ``configuration.py``)
  times coarser than the others *and* the median case has fewer than a third as many voxels
  along it as along the others, that axis takes the 10th percentile of its spacings (at
  least the other axes' largest spacing + 1e-5), so thick slices are not interpolated into
  many invented ones.
* **Pooling per axis and convolution kernels** (``experiment_planning/experiment_planners/
  network_topology.py``, ``get_pool_and_conv_props``): an axis is pooled while its feature map
  keeps ≥ 2 × 4 voxels (≥ 3 × 4 when it is the only one) and its current spacing is < 2 × the
  finest pooled spacing; so a thick-slice plan starts ``[1, 2, 2]`` and pools across slices
  only once the in-plane spacing has caught up. A kernel is 1 along an axis until its spacing
  is within 2 × the finest (then 3); the bottleneck is 3 × 3 × 3. The patch is rounded up to a
  multiple of each axis's total stride.
* **Patch size** (``ExperimentPlanner.get_plans_for_configuration``): proportional to 1 /
  spacing (equal extent in mm along every axis), clipped to the median case's size. nnU-Net
  then shrinks a 256³-voxel start until its 32–320-channel network fits 8 GB of GPU memory;
  biasseg's networks are configurable and often run on a CPU, so the budget here is a voxel
  count (``data.plan_patch_voxels``) instead — the one deliberate difference.
* **Normalisation per channel** (``preprocessing/normalization/map_channel_name_to_normalization.py``
  and ``ExperimentPlanner.determine_normalization_scheme_and_whether_mask_is_used_for_norm``):
  a channel named CT (any case) gets CT normalisation (clip to the training foreground's
  0.5–99.5 percentiles, z-score with its mean and sd); ``noNorm`` none; any other name a
  per-image z-score, computed inside the non-zero mask (and zero kept outside it) when the
  crop reduced the median case to less than 3/4 of its size.

The plan is what the data section runs with unless a key sets it: ``data.target_spacing``,
``data.patch_size``, ``data.normalization`` and ``model.strides`` each override their entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

ANISO_THRESHOLD = 3  # nnunetv2/configuration.py
MIN_FEATURE_MAP_EDGE = 4  # ExperimentPlanner.UNet_featuremap_min_edge_length
MASK_FOR_NORM_BELOW = 0.75  # use the non-zero mask for z-scores when cropping kept less than this share
SCHEMES = ("ct", "zscore", "zscore_nonzero", "none")  # per channel; zscore_nonzero: inside the non-zero mask


@dataclass(frozen=True)
class Fingerprint:
    """What the plan is made from: per case the spacing (mm) and the size after the non-zero
    crop (voxels), both ``(N, 3)`` in RAS+ axis order; the median share of voxels the crop keeps;
    the channels' names (``dataset.json``)."""

    spacings: np.ndarray
    sizes_after_crop: np.ndarray
    median_relative_size_after_cropping: float
    channel_names: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """The planned settings (see the module docstring); ``strides`` ``(pooling steps, 3)`` and
    ``kernel_sizes`` ``(pooling steps + 1, 3)`` describe the U-Net as deep as the patch allows,
    ``normalization`` one scheme per channel."""

    target_spacing: list[float]
    patch_size: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    normalization: list[str]
    median_size: list[float]
    batch_size: int = 2  # the training length, as set (data.batch_size, data.steps_per_epoch), not planned
    steps_per_epoch: int | None = None  # None: samples_per_volume × subjects / batch_size

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The plan as a short table for the log."""
        rows = [
            ("target spacing (mm)", " × ".join(f"{s:.3g}" for s in self.target_spacing)),
            ("median size at it (voxels)", " × ".join(f"{s:.0f}" for s in self.median_size)),
            ("patch (voxels)", " × ".join(str(p) for p in self.patch_size)),
            ("U-Net strides per stage", " ".join("".join(str(s) for s in stride) for stride in self.strides)),
            ("U-Net kernels per stage", " ".join("".join(str(k) for k in kernel) for kernel in self.kernel_sizes)),
            ("normalisation per channel", ", ".join(self.normalization)),
            ("batch, steps per epoch", f"{self.batch_size}, {self.steps_per_epoch or 'samples_per_volume × subjects / batch'}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def target_spacing(spacings: np.ndarray, sizes_after_crop: np.ndarray) -> list[float]:
    """nnU-Net's full-resolution target spacing (mm) from per-case spacings and sizes ``(N, 3)``."""
    spacings, sizes = np.asarray(spacings, dtype=np.float64), np.asarray(sizes_after_crop, dtype=np.float64)
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(sizes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(3) if axis != worst]
    aniso_spacing = target[worst] > ANISO_THRESHOLD * max(target[others])
    aniso_voxels = target_size[worst] * ANISO_THRESHOLD < min(target_size[others])
    if aniso_spacing and aniso_voxels:
        low_resolution = float(np.percentile(spacings[:, worst], 10))
        if low_resolution < max(target[others]):
            low_resolution = max(max(target[others]), low_resolution) + 1e-5
        target[worst] = low_resolution
    return [float(s) for s in target]


def pooling(spacing: Sequence[float], patch_size: Sequence[int], max_pools: int | None = None
            ) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """``(strides, kernel_sizes, patch)``: nnU-Net's ``get_pool_and_conv_props`` for at most
    ``max_pools`` pooling steps (None: as many as the patch allows). ``strides`` has one entry per
    pooling step, ``kernel_sizes`` one per stage (steps + 1, the last the bottleneck's 3 × 3 × 3);
    ``patch`` is ``patch_size`` rounded up to a multiple of each axis's total stride."""
    current_spacing = [float(s) for s in spacing]
    current_size = [float(p) for p in patch_size]
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    kernel = [1, 1, 1]
    pools = [0, 0, 0]
    while max_pools is None or len(strides) < max_pools:
        valid = [axis for axis in range(3) if current_size[axis] >= 2 * MIN_FEATURE_MAP_EDGE]
        if not valid:
            break
        finest = min(current_spacing[axis] for axis in valid)
        valid = [axis for axis in valid if current_spacing[axis] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * MIN_FEATURE_MAP_EDGE:
            break
        if not valid:
            break
        for axis in range(3):
            if kernel[axis] != 3 and current_spacing[axis] / min(current_spacing) < 2:
                kernel[axis] = 3
        stride = [2 if axis in valid else 1 for axis in range(3)]
        for axis in valid:
            pools[axis] += 1
            current_spacing[axis] *= 2
            current_size[axis] = math.ceil(current_size[axis] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3, 3, 3])
    divisor = [2**p for p in pools]
    padded = [int(math.ceil(p / d) * d) for p, d in zip(patch_size, divisor)]
    return strides, kernels, padded


def normalization_schemes(channel_names: Sequence[str], median_relative_size_after_cropping: float) -> list[str]:
    """One of :data:`SCHEMES` per channel, by its name (nnU-Net's mapping)."""
    use_mask = median_relative_size_after_cropping < MASK_FOR_NORM_BELOW
    schemes = []
    for name in channel_names:
        key = str(name).casefold()
        if key == "ct":
            schemes.append("ct")
        elif key == "nonorm":
            schemes.append("none")
        else:  # nnU-Net: every other name is z-scored per image (rescale_to_0_1/rgb_to_0_1 are 2D images' schemes)
            schemes.append("zscore_nonzero" if use_mask else "zscore")
    return schemes


def patch_size(spacing: Sequence[float], median_size: Sequence[float], voxels: int) -> list[int]:
    """A patch of about ``voxels`` voxels with equal extent in mm along each axis (∝ 1 / spacing),
    no larger than the median case along any axis (nnU-Net's starting patch, with this budget)."""
    inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
    shape = inverse * (voxels / np.prod(inverse)) ** (1 / 3)
    shape = np.minimum(np.round(shape), np.asarray(median_size))
    return [max(1, int(s)) for s in shape]


def make_plan(fingerprint: Fingerprint, patch_voxels: int) -> Plan:
    """The plan for a patch budget of ``patch_voxels`` voxels, pooled as deep as the patch allows
    (a U-Net of fewer stages takes the first steps: ``FolderDataModule.network_plan``)."""
    spacing = target_spacing(fingerprint.spacings, fingerprint.sizes_after_crop)
    # the median case's size at the target spacing (nnU-Net: compute_new_shape of each case, then the median)
    resized = np.round(fingerprint.spacings / np.asarray(spacing) * fingerprint.sizes_after_crop)
    median_size = np.median(resized, axis=0)
    strides, kernels, patch = pooling(spacing, patch_size(spacing, median_size, patch_voxels))
    return Plan(
        target_spacing=spacing,
        patch_size=patch,
        strides=strides,
        kernel_sizes=kernels,
        normalization=normalization_schemes(fingerprint.channel_names, fingerprint.median_relative_size_after_cropping),
        median_size=[float(s) for s in median_size],
    )
