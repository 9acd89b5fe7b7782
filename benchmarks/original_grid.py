"""Validation measured on the annotated grid vs on the resampled grid: the cost of mapping back.

Since biasseg measures every validation subject where it was annotated, each one's class
probabilities are mapped from the preprocessed grid back to its original grid
(:mod:`datamodules.original_grid`) before the metrics. This times one validation subject as
the LightningModule validates it — sliding-window inference, then the per-subject metrics —
both ways, alternating rounds: the *peer* is the previous behaviour (metrics on the resampled
grid against the resampled label), *ours* adds the mapping and measures on the original grid.
The case: thick slices (``--spacing``, default 1 × 1 × 3 mm) resampled to 1 mm isotropic.

    python benchmarks/original_grid.py --quick
"""

from __future__ import annotations

import common
import numpy as np
import torch

from biasseg.metrics import SubjectSegmentationMetrics
from datamodules.original_grid import OriginalGrid
from lightning_modules.sliding_window import SlidingWindow
from lightning_modules.unet import UNet3D


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--shape", type=common.triple, default=None, help="original grid (voxels); quick 96x96x24, else 192x192x48")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 3.0], help="original spacing (mm)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = common.select_device(args.device, args.quick)
    shape = args.shape or ((96, 96, 24) if args.quick else (192, 192, 48))
    spacing = np.asarray(args.spacing, dtype=float)
    resampled = tuple(int(round(n * s)) for n, s in zip(shape, spacing))  # 1 mm target
    original = OriginalGrid(np.diag([*spacing, 1.0]), shape)
    target_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    target_affine[:3, 3] = -(spacing - 1) / 2  # a 1 mm grid over the same field (edges aligned)
    net = UNet3D(1, 2, [8, 16, 32, 64]).to(device).eval()
    window = SlidingWindow(patch_size=(64, 64, 32) if args.quick else (96, 96, 64), overlap=0.5, batch_size=2)
    image = torch.randn(1, *resampled, device=device)
    label_resampled = (torch.rand(resampled, device=device) > 0.9).long()
    label_original = (torch.rand(shape, device=device) > 0.9).long()

    def validate(on_original: bool) -> None:
        metric = SubjectSegmentationMetrics(2).to(device)
        with torch.no_grad(), common.autocast(device, args.precision):
            probabilities = window(image, net).float()
        if on_original:
            metric.update(original.probabilities(probabilities, target_affine), label_original, original.spacing, 0)
        else:
            metric.update(probabilities, label_resampled, (1.0, 1.0, 1.0), 0)

    validate(True), validate(False)  # warm-up
    ours, peer = [], []
    for _ in range(args.rounds):
        ours.append(common.timed(lambda: validate(True), device))
        peer.append(common.timed(lambda: validate(False), device))
    mapping = [common.timed(lambda: original.probabilities(torch.rand(2, *resampled, device=device), target_affine), device)
               for _ in range(args.rounds)]
    print(common.describe_environment(device, args.precision))
    print(f"original {shape} at {spacing.tolist()} mm → resampled {resampled} at 1 mm; {args.rounds} alternating rounds")
    common.print_table(["way", "median s/subject", "min..max"], [
        ["on the original grid (ours)", common.median(ours), common.spread(ours)],
        ["on the resampled grid (before)", common.median(peer), common.spread(peer)],
        ["mapping back alone", common.median(mapping), common.spread(mapping)],
    ])
    ratio = common.median(ours) / common.median(peer)
    print(f"validation time, ours / before = {ratio:.3f} (goal <= 1.25)")
    common.emit("original_grid_validation", common.median(ours), common.median(peer), "s/subject", 1 / ratio)


if __name__ == "__main__":
    main()
