"""Back to the grid a case was annotated on: the inverse of reorientation, resampling and crop.

Training and sliding-window inference run on the preprocessed grid (RAS+, target spacing,
non-zero crop). A volume a user can quote is measured against the annotation itself, on its
own voxels, with its own voxel volume, so validation, ``evaluate.py`` and ``predict.py`` all
map the model's class probabilities back to the original grid here (one implementation).

Every original voxel centre is carried through both affines (``inv(A_preprocessed) ·
A_original``) into the preprocessed grid and the probabilities are interpolated there
(trilinear: a convex combination of probability vectors is one, so the classes still sum
to 1). A centre outside the preprocessed box by more than half a voxel lies in what the
non-zero crop removed: background. Centres within that half voxel take the nearest edge
values (no blending with a zero padding). This is nnU-Net's export (probabilities resampled
linearly back to each case's geometry, the crop's outside filled with background), done on
the model's device in slabs so that a CT-sized grid needs no more than a slab's temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.image_files import AFFINE_TOLERANCE  # grids this close are the same grid

SLAB_VOXELS = 1 << 22  # original voxels resampled per pass: bounds the sampling grid's memory (~50 MB)


@dataclass(frozen=True)
class OriginalGrid:
    """The annotated grid of a case: ``affine`` (4 × 4, mm, RAS+ world as TorchIO reads it; the
    voxel axes as stored in the file) and ``shape`` ``(W, H, D)``."""

    affine: np.ndarray
    shape: tuple[int, int, int]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm along the stored axes."""
        return tuple(float(s) for s in np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0))

    @property
    def voxel_ml(self) -> float:
        """One voxel's volume in ml (``|det A|`` mm³ / 1000)."""
        return abs(float(np.linalg.det(np.asarray(self.affine, dtype=np.float64)[:3, :3]))) / 1000.0

    def same_as(self, affine: np.ndarray, shape: tuple[int, ...]) -> bool:
        """Whether ``(affine, shape)`` is this grid (no resampling needed)."""
        return tuple(shape) == tuple(self.shape) and np.allclose(affine, self.affine, atol=AFFINE_TOLERANCE)

    def probabilities(self, probabilities: torch.Tensor, affine: np.ndarray, background: bool = True) -> torch.Tensor:
        """Class probabilities ``(C, W', H', D')`` on the grid ``affine`` → ``(C, W, H, D)`` on
        this one, on the same device; outside the source box class 0 (the background) is 1, or
        with ``background=False`` (region probabilities, no background channel) every channel 0."""
        if self.same_as(affine, probabilities.shape[1:]):
            return probabilities
        return self._sample(probabilities, affine, "bilinear", outside=0 if background else None)

    def segmentations(self, segmentations: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
        """Label maps ``(M, W', H', D')`` (integers) on the grid ``affine`` → ``(M, W, H, D)`` here,
        nearest neighbour (0 outside)."""
        if self.same_as(affine, segmentations.shape[1:]):
            return segmentations
        return self._sample(segmentations.float(), affine, "nearest", outside=None).round().to(segmentations.dtype)

    def _sample(self, data: torch.Tensor, affine: np.ndarray, mode: str, outside: int | None) -> torch.Tensor:
        """``data`` ``(C, …)`` sampled at this grid's voxel centres. ``outside``: the class
        whose one-hot vector fills centres beyond the source box (None: zeros)."""
        device, source_shape = data.device, data.shape[1:]
        to_source = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(self.affine, dtype=np.float64)
        matrix = torch.as_tensor(to_source[:3, :3], dtype=torch.float32, device=device)
        offset = torch.as_tensor(to_source[:3, 3], dtype=torch.float32, device=device)
        size = torch.as_tensor(source_shape, dtype=torch.float32, device=device)
        # grid_sample's normalised coordinates (align_corners=True): −1 and 1 are the first and last
        # voxel centres; a one-voxel axis has no extent (its only centre is 0)
        scale = torch.where(size > 1, 2.0 / (size - 1).clamp(min=1), torch.zeros_like(size))
        w, h, d = self.shape
        slab = max(1, SLAB_VOXELS // max(h * d, 1))
        ys, zs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(d, device=device, dtype=torch.float32), indexing="ij")
        source = data[None]  # (1, C, W', H', D'): grid_sample's last grid coordinate indexes W'
        out = torch.empty((data.shape[0], w, h, d), dtype=data.dtype, device=device)
        for start in range(0, w, slab):
            xs = torch.arange(start, min(start + slab, w), device=device, dtype=torch.float32)
            points = torch.stack(torch.broadcast_tensors(xs.view(-1, 1, 1), ys[None], zs[None]), dim=-1)  # (n, H, D, 3)
            index = points @ matrix.T + offset  # voxel indices in the source grid
            inside = ((index >= -0.5) & (index <= size - 0.5)).all(-1)
            grid = (index * scale - torch.where(size > 1, torch.ones_like(size), torch.zeros_like(size))).flip(-1)
            values = F.grid_sample(source, grid[None], mode=mode, padding_mode="border", align_corners=True)[0]
            values = values * inside
            if outside is not None:
                values[outside] += ~inside
            out[:, start:start + len(xs)] = values
        return out
