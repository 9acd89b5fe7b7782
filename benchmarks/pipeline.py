"""Training patches per second: our data pipeline against a plain TorchIO Queue.

Both read the same generated ``.nii.gz`` dataset (nnU-Net v2 layout, volumes of realistic
size with an empty border) with the same patch size, samples per volume, label sampler
(33 % foreground), worker count, batch size and transforms (z-score + the default
augmentation of ``configs/data/loader/default.yaml``: flip, affine, gamma, noise):

* **peer**: ``SubjectsDataset`` (ZNormalization + augmentation on whole subjects) →
  ``Queue`` (``LabelSampler``) → ``SubjectsLoader``, TorchIO's documented recipe;
* **ours**: ``data=folder`` — the preprocessing cache (built once beforehand, its time
  reported separately) read memory-mapped patch by patch by ``PatchBatches``.

Each round times one full pass of ``--patches`` patches, worker start-up included;
rounds alternate ours/peer and the medians are compared.

    python benchmarks/pipeline.py --quick           # ≤ 2 min on 2 CPU cores
    python benchmarks/pipeline.py                   # 8 volumes of 192³, 128³ patches
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from common import ROOT, base_parser, emit, median, print_table, spread, triple
from hydra.utils import instantiate
from omegaconf import OmegaConf

from datamodules import FolderDataModule
from datamodules.segmentation import resolve_num_workers


def write_dataset(root: Path, count: int, shape: tuple[int, int, int], seed: int) -> None:
    """``count`` MR-like volumes: a noisy head-shaped ellipsoid in an empty border, with a
    few label spheres inside (nnU-Net v2 raw layout, gzip-compressed NIfTI)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    head = ((grid / 0.85) ** 2).sum(0) < 1
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        label = np.zeros(shape, np.uint8)
        for _ in range(3):
            centre = rng.uniform(-0.5, 0.5, 3).astype(np.float32)[:, None, None, None]
            label[((grid - centre) ** 2).sum(0) < rng.uniform(0.01, 0.03)] = 1
        image = (head * (300 + 200 * label.astype(np.float32) + rng.normal(0, 30, shape))).astype(np.float32)
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"vol_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"vol_{i:03d}.nii.gz")
    description = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "lesion": 1},
                   "numTraining": count, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(description))


def default_augmentation() -> dict:
    """The default training augmentation, instantiated from the shipped config."""
    loader = OmegaConf.load(ROOT / "configs" / "data" / "loader" / "default.yaml")
    return {name: instantiate(node) for name, node in loader.augmentation.items() if node is not None}


def ours_loader(root: Path, cache: Path, args, workers: int):
    dm = FolderDataModule(
        root=str(root), cache_dir=str(cache), val_fraction=1 / args.volumes, num_workers=workers,
        patch_size=args.patch, batch_size=args.batch, samples_per_volume=args.samples_per_volume,
        augmentation=default_augmentation(), augmentation_context=0.15, splits_file=None,
    )
    start = time.perf_counter()
    dm.setup()
    return dm, time.perf_counter() - start


def peer_loader(root: Path, cases: list[str], args, workers: int) -> tio.SubjectsLoader:
    subjects = [
        tio.Subject(image=tio.ScalarImage(root / "imagesTr" / f"{c}_0000.nii.gz"), label=tio.LabelMap(root / "labelsTr" / f"{c}.nii.gz"))
        for c in cases
    ]
    transform = tio.Compose([tio.ZNormalization(include=["image"]), *default_augmentation().values()])
    queue = tio.Queue(
        tio.SubjectsDataset(subjects, transform=transform),
        max_length=max(args.samples_per_volume * 2, 2 * args.batch),
        samples_per_volume=args.samples_per_volume,
        sampler=tio.LabelSampler(args.patch, label_name="label", label_probabilities={0: 0.67, 1: 0.33}),
        num_workers=workers,
        shuffle_subjects=True,
        shuffle_patches=True,
    )
    return tio.SubjectsLoader(queue, batch_size=args.batch, num_workers=0)


def patches_per_second(make_iterable, wanted: int) -> float:
    """Patches per second over ``wanted`` patches of fresh passes (start-up included)."""
    start, seen = time.perf_counter(), 0
    while seen < wanted:
        for batch in make_iterable():
            seen += len(batch["image"][tio.DATA])
            if seen >= wanted:
                break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--volumes", type=int, default=8, help="generated volumes")
    parser.add_argument("--shape", type=triple, default=(192, 192, 192), help="volume size in voxels")
    parser.add_argument("--patch", type=triple, default=(128, 128, 128), help="patch size in voxels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--samples-per-volume", type=int, default=4)
    parser.add_argument("--patches", type=int, default=96, help="patches timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per method")
    parser.add_argument("--workers", default="auto", help="loader workers for both (auto = CPU cores − 1, ≤ 8)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the generated data in this folder")
    args = parser.parse_args()
    if args.quick:
        args.volumes, args.shape, args.patch = 4, (160, 160, 128), (64, 64, 64)
        args.patches, args.rounds, args.samples_per_volume = 64, 3, 4
    workers = resolve_num_workers(args.workers)
    torch.manual_seed(args.seed)
    work = args.keep or Path(tempfile.mkdtemp(prefix="biasseg-pipeline-"))
    try:
        root = work / "data"
        if not (root / "dataset.json").exists():
            start = time.perf_counter()
            write_dataset(root, args.volumes, args.shape, args.seed)
            print(f"wrote {args.volumes} volumes of {args.shape} in {time.perf_counter() - start:.1f} s → {root}")
        dm, cache_seconds = ours_loader(root, work / "cache", args, workers)
        cases = [c.name for c in dm.train_cases]
        peer = peer_loader(root, cases, args, workers)
        ours_rates, peer_rates = [], []
        ours_loader_ = dm.train_dataloader()  # created once, iterated every epoch, as a Trainer does
        for _ in range(args.rounds):
            ours_rates.append(patches_per_second(lambda: ours_loader_, args.patches))
            peer_rates.append(patches_per_second(lambda: peer, args.patches))
        ours, theirs = median(ours_rates), median(peer_rates)
        print(f"cases {len(cases)} × {args.samples_per_volume} patches of {args.patch} from {args.shape}, batch {args.batch}, "
              f"workers {workers}; preprocessing cache built once in {cache_seconds:.1f} s")
        print_table(
            ["pipeline", "patches/s (median)", "spread"],
            [["ours (cache + PatchBatches)", ours, spread(ours_rates)],
             ["peer (TorchIO Queue on .nii.gz)", theirs, spread(peer_rates)]],
        )
        emit("pipeline", ours, theirs, "patches/s", ours / theirs)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
