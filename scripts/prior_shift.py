"""Does foreground oversampling explain cross-entropy's log-odds offset? The analytic prior
correction against the fitted Platt bias.

    python scripts/prior_shift.py high_uncertainty large_field_of_view --runs results/study_runs

A network trained on patches whose foreground voxel share is ``π_patch`` learns posteriors for
that prior; on whole scans (share ``π_scan``) Bayes' rule moves every log-odds by
``logit(π_scan) − logit(π_patch)`` (Saerens et al. 2002; Le Folgoc et al. 2021 for rebalanced
batches in segmentation). For each experiment this draws the training patches its data config
draws (``data.sampler``, ``foreground_probability``, patch size; ``--epochs`` epochs of the
real patch stream, augmentation included) and counts their foreground voxels, counts those of
the whole training scans, and prints the correction beside the Platt bias ``b`` (and slope
``a``) fitted at the final validation of the cross-entropy runs in ``--runs/<task>/ce/*/``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from biasseg.cli import compose_config

ROOT = Path(__file__).resolve().parent.parent  # the checkout: results/


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def shares(task: str, epochs: int) -> tuple[float, float]:
    """Foreground voxel share of the training patches and of the whole training scans."""
    cfg = compose_config("train", [f"experiment={task}", "data.num_workers=0"])
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    torch.manual_seed(0)
    loader = datamodule.train_dataloader()
    foreground = total = 0
    for epoch in range(epochs):
        datamodule.set_epoch(epoch)
        for batch in loader:
            label = batch["label"]["data"]
            foreground += int((label > 0).sum())
            total += label.numel()
    scan_foreground = sum(int((np.asarray(c.arrays()[1]) > 0).sum()) for c in datamodule.train_cases)
    scan_total = sum(int(np.asarray(c.arrays()[1]).size) for c in datamodule.train_cases)
    return foreground / total, scan_foreground / scan_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", nargs="+", help="experiment names (configs/experiment/)")
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "study_runs", help="<runs>/<task>/ce/<seed>/metrics.json")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of patches drawn")
    args = parser.parse_args()
    print("| task | foreground share: patches | whole scans | analytic shift logit(scan) − logit(patch) | fitted Platt b (a), CE seeds |")
    print("| --- | --- | --- | --- | --- |")
    for task in args.tasks:
        patch, scan = shares(task, args.epochs)
        fitted = []
        for metrics in sorted((args.runs / task / "ce").glob("*/metrics.json")):
            values = json.loads(metrics.read_text())
            fitted.append(f"{values['val/platt_bias']:+.3f} ({values['val/platt_slope']:.2f})")
        print(f"| {task} | {100 * patch:.2f} % | {100 * scan:.2f} % | {logit(scan) - logit(patch):+.3f} | {', '.join(fitted) or '—'} |")


if __name__ == "__main__":
    main()
