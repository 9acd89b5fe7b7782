"""Training iterations per second with real data against in-memory synthetic batches.

A real ``pl.Trainer`` fit of the segmentation module, once fed by our data pipeline
(``data=folder`` on a generated ``.nii.gz`` dataset: preprocessing cache, label sampler,
default augmentation, ``data.num_workers=auto``) and once by one pre-made batch repeated
in memory (what nnU-Net calls dummy data). Equal speeds mean the GPU never waits for data.
A callback times every step (device synchronised at the step's end) and the gap before the
next one starts (waiting for the batch); medians over the steps after a warm-up.

    python benchmarks/training.py --quick                      # tiny, CPU, ≤ 2 min
    python benchmarks/training.py --device cuda --precision bf16   # nnU-Net size: 32→320, 128³, batch 2

``ours`` = it/s with real data, ``peer`` = it/s with in-memory data, ``ratio`` = ours/peer.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchio as tio
from common import base_parser, emit, gib, ints, median, print_table, select_device, triple
from pipeline import default_augmentation, write_dataset
from torch.utils.data import DataLoader, IterableDataset

from biasseg.losses import CrossEntropyLoss
from datamodules import FolderDataModule
from datamodules.segmentation import resolve_num_workers
from lightning_modules import SegmentationModule


class StepTimer(pl.Callback):
    """Per step: compute time (batch start → synchronised end) and data wait (previous end → start)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.compute: list[float] = []
        self.wait: list[float] = []
        self._start = self._end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if self._end is not None:
            self.wait.append(self._start - self._end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._end = time.perf_counter()
        self.compute.append(self._end - self._start)


class RepeatedBatch(IterableDataset):
    """The same batch ``steps`` times: data loading costs nothing."""

    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch

    def __len__(self) -> int:
        return self.steps


def fit(module_factory, loader_or_datamodule, args, device: torch.device) -> dict:
    timer = StepTimer(device)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        max_steps=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        benchmark=device.type == "cuda",
        callbacks=[timer],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    module = module_factory()
    if isinstance(loader_or_datamodule, pl.LightningDataModule):
        trainer.fit(module, datamodule=loader_or_datamodule)
    else:
        trainer.fit(module, train_dataloaders=loader_or_datamodule)
    skip = min(args.warmup, len(timer.compute) - 1)
    compute, wait = timer.compute[skip:], timer.wait[skip:]
    step = median([c + w for c, w in zip(compute, wait)])
    return {
        "it/s": 1.0 / step,
        "wait": sum(wait) / (sum(wait) + sum(compute[: len(wait)])),
        "peak_gib": gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "steps": len(compute),
    }


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--features", type=ints, default=[32, 64, 128, 256, 320, 320])
    parser.add_argument("--patch", type=triple, default=(128, 128, 128))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=80, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=15, help="steps left out of the statistics")
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--shape", type=triple, default=(192, 192, 192))
    parser.add_argument("--workers", default="auto")
    args = parser.parse_args()
    if args.quick:
        args.features, args.patch, args.steps, args.warmup = [4, 8, 16], (32, 32, 32), 30, 5
        args.volumes, args.shape = 4, (64, 64, 64)
    device = select_device(args.device, args.quick)
    workers = resolve_num_workers(args.workers)
    pl.seed_everything(args.seed, verbose=False)
    work = Path(tempfile.mkdtemp(prefix="biasseg-training-"))
    try:
        write_dataset(work / "data", args.volumes, args.shape, args.seed)
        datamodule = FolderDataModule(
            root=str(work / "data"), cache_dir=str(work / "cache"), val_fraction=1 / args.volumes,
            num_workers=workers, patch_size=args.patch, batch_size=args.batch,
            samples_per_volume=max(1, args.steps * args.batch // (args.volumes - 1) + 1),
            augmentation=default_augmentation(), augmentation_context=0.15, splits_file=None,
        )
        datamodule.setup()  # builds the preprocessing cache before anything is timed
        module_factory = partial(
            SegmentationModule, loss=CrossEntropyLoss(), in_channels=1, num_classes=2, features=args.features,
            deep_supervision=True, optimizer=partial(torch.optim.SGD, lr=1e-2, momentum=0.99, nesterov=True),
            sliding_window={"patch_size": list(args.patch)},
        )
        real = fit(module_factory, datamodule, args, device)
        example = next(iter(datamodule.train_dataloader()))
        batch = {k: {tio.DATA: v[tio.DATA].pin_memory() if device.type == "cuda" else v[tio.DATA]} for k, v in example.items()}
        memory = fit(module_factory, DataLoader(RepeatedBatch(batch, args.steps), batch_size=None), args, device)
        print(f"U-Net {args.features}, patch {args.patch}, batch {args.batch}, {args.precision}, deep supervision, "
              f"{workers} workers, device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
        print_table(
            ["data", "it/s (median)", "waiting for data", "peak GPU GiB", "steps"],
            [["real (cache + PatchBatches)", real["it/s"], f"{100 * real['wait']:.1f} %", real["peak_gib"], real["steps"]],
             ["in-memory batch", memory["it/s"], f"{100 * memory['wait']:.1f} %", memory["peak_gib"], memory["steps"]]],
        )
        emit("training", real["it/s"], memory["it/s"], "it/s", real["it/s"] / memory["it/s"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
