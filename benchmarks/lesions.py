"""The cost of lesion-wise measures in validation, on a scan with 50 lesions.

Times one validation subject as the LightningModule validates it — sliding-window inference,
the per-subject metrics — without (*peer*) and with (*ours*) the lesion measures of
:mod:`biasseg.metrics.lesions` (components, BraTS 2023 matching, per-lesion soft volumes),
alternating rounds; and the lesion measures alone beside panoptica's evaluation of the same
masks (IoU matching; when panoptica is installed). The scan: ``--lesions`` spheres of radius
1–10 voxels, one per cell of a regular grid, and a soft map around them that misses some and
adds false positives.

    python benchmarks/lesions.py --quick
"""

from __future__ import annotations

import common
import numpy as np
import torch

from biasseg.metrics import SubjectSegmentationMetrics
from biasseg.metrics.lesion_metrics import LesionMetrics
from biasseg.metrics.lesions import LesionSettings
from lightning_modules.sliding_window import SlidingWindow
from lightning_modules.unet import UNet3D


def scan(shape: tuple[int, int, int], lesions: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(label (W, H, D) int64, probabilities (2, W, H, D))``: ``lesions`` spheres of radius 1 to
    10 voxels (at most a third of their cell of a regular grid, so they stay apart), and a soft
    map that finds most of them, misses every tenth and adds a few of its own."""
    cells = int(np.ceil(lesions ** (1 / 3)))
    size = np.array(shape) / cells
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"), -1)
    label = np.zeros(shape, bool)
    soft = np.zeros(shape, np.float32)
    corners = [np.array(c) * size for c in np.ndindex(cells, cells, cells)]
    for i, corner in enumerate(corners[:lesions]):
        radius = rng.uniform(1, min(10, size.min() / 3))
        centre = corner + size / 2 + rng.uniform(-1, 1, 3) * (size / 2 - radius - 1).clip(0)
        distance = np.sqrt(((grid - centre) ** 2).sum(-1))
        label |= distance <= radius
        if i % 10:
            soft = np.maximum(soft, 1 / (1 + np.exp(distance - radius - rng.normal(0, 0.7))))
    for corner in corners[lesions:lesions + lesions // 10]:  # false positives in the cells left over
        soft = np.maximum(soft, 1 / (1 + np.exp(np.sqrt(((grid - corner - size / 2) ** 2).sum(-1)) - 2)))
    p = torch.from_numpy(soft)
    return torch.from_numpy(label.astype(np.int64)), torch.stack([1 - p, p])


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--shape", type=common.triple, default=None, help="scan (voxels); quick 128x128x96, else 256x256x160")
    parser.add_argument("--lesions", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = common.select_device(args.device, args.quick)
    shape = args.shape or ((128, 128, 96) if args.quick else (256, 256, 160))
    label, probabilities = scan(shape, args.lesions, np.random.default_rng(args.seed))
    label, probabilities = label.to(device), probabilities.to(device)
    net = UNet3D(1, 2, [8, 16, 32, 64]).to(device).eval()
    window = SlidingWindow(patch_size=(64, 64, 32) if args.quick else (96, 96, 64), overlap=0.5, batch_size=2)
    image = torch.randn(1, *shape, device=device)
    settings = LesionSettings()

    def validate(lesions: bool) -> None:
        with torch.no_grad(), common.autocast(device, args.precision):
            window(image, net)  # the inference every validation subject needs (its output is not what is scored here)
        SubjectSegmentationMetrics(2).to(device).update(probabilities, label, (1.0, 1.0, 1.0), 0)
        if lesions:
            LesionMetrics(settings).update(probabilities, label, (1.0, 1.0, 1.0), 0)

    validate(True), validate(False)  # warm-up
    ours, peer = [], []
    for _ in range(args.rounds):
        ours.append(common.timed(lambda: validate(True), device))
        peer.append(common.timed(lambda: validate(False), device))
    alone = [common.timed(lambda: LesionMetrics(LesionSettings(match="iou")).update(probabilities, label, (1.0, 1.0, 1.0), 0), device)
             for _ in range(args.rounds)]
    found = LesionMetrics(settings)
    found.update(probabilities, label, (1.0, 1.0, 1.0), 0)
    rows = found.compute()
    rows_table = [["validation with lesion measures (ours)", common.median(ours), common.spread(ours)],
                  ["validation without them (before)", common.median(peer), common.spread(peer)],
                  ["lesion measures alone, IoU matching", common.median(alone), common.spread(alone)]]
    try:
        import panoptica  # test-only oracle (see .ci/run)

        evaluator = panoptica.Panoptica_Evaluator(
            expected_input=panoptica.InputType.SEMANTIC, instance_approximator=panoptica.ConnectedComponentsInstanceApproximator(),
            instance_matcher=panoptica.NaiveThresholdMatching(), verbose=False)
        masks = (probabilities.argmax(0).cpu().numpy().astype(np.uint8), label.cpu().numpy().astype(np.uint8))
        theirs = [common.timed(lambda: evaluator.evaluate(*masks, verbose=False), device) for _ in range(args.rounds)]
        rows_table.append(["panoptica, IoU matching (its default metrics)", common.median(theirs), common.spread(theirs)])
    except ImportError:
        theirs = None
    print(common.describe_environment(device, args.precision))
    print(f"scan {shape}, {args.lesions} lesions drawn ({int((rows[:, 3] == 1).sum())} reference lesions after merging, "
          f"{int((rows[:, 3] == 0).sum())} false positives); {args.rounds} alternating rounds")
    common.print_table(["what", "median s/subject", "min..max"], rows_table)
    ratio = common.median(ours) / common.median(peer)
    print(f"validation time, with / without lesion measures = {ratio:.3f} (goal <= 1.10)")
    if theirs is not None:
        print(f"lesion measures alone / panoptica = {common.median(alone) / common.median(theirs):.3f}")
    common.emit("lesion_validation", common.median(ours), common.median(peer), "s/subject", 1 / ratio)


if __name__ == "__main__":
    main()
