"""nnU-Net v2 side of a benchmark: plan, preprocess, train and validate nnU-Net on the CPU.

Benchmark-only helper: neither the biasseg package nor its tests import it. :func:`train_nnunet`
runs nnU-Net v2's own pipeline on a raw dataset (nnU-Net layout, folder ``DatasetXXX_Name``):
fingerprint, plans, ``3d_fullres`` preprocessing, training of the default ``nnUNetTrainer``
(fold 0 of nnU-Net's 5-fold split) for a fixed number of iterations, then nnU-Net's final
validation of the fold-0 validation cases with probabilities (``<case>.npz`` + ``.nii.gz``).
Everything is written under ``work_dir`` (``nnUNet_raw`` / ``nnUNet_preprocessed`` /
``nnUNet_results`` point into it).

nnU-Net starts ``spawn`` process pools (fingerprint, preprocessing, unpacking, export, metrics):
call :func:`train_nnunet` from under ``if __name__ == "__main__":``. Data augmentation runs
in-process (``nnUNet_n_proc_DA=0`` while training) and the pools use one worker
(``nnUNet_def_n_proc=1`` unless set, which counts only before nnU-Net is first imported).
torch.compile is off (nnU-Net never compiles on the CPU anyway).

Needs, besides the project's requirements (never let pip replace the installed torch):

    pip install --no-deps nnunetv2==2.8.1 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 \
        acvl-utils==0.2.6 dynamic-network-architectures==0.4.4
    pip install blosc2==4.15.0 scikit-image==0.26.0 connected-components-3d==4.1.1 seaborn==0.13.2

Call it with a fresh ``work_dir``; a raw dataset outside ``work_dir/nnUNet_raw`` is linked there.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("nnUNet_def_n_proc", "1")  # read when nnunetv2.configuration is imported
os.environ["nnUNet_compile"] = "f"

import numpy as np
import torch
from nnunetv2.experiment_planning.plan_and_preprocess_api import (
    extract_fingerprint_dataset,
    plan_experiment_dataset,
    preprocess_dataset,
)
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

CONFIGURATION = "3d_fullres"
CPU = torch.device("cpu")


class nnUNetTrainerBenchmark(nnUNetTrainer):
    """The default trainer with a short validation loop per epoch; the schedule is set by :func:`train_nnunet`.

    The signature must stay the parent's: nnU-Net records its ``__init__`` arguments by name.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = CPU):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_val_iterations_per_epoch = 2


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_nnunet(
    raw_dataset_dir: Path, work_dir: Path, dataset_id: int, iterations: int, epochs: int = 1, seed: int = 0,
    train: bool = True,
) -> dict:
    """Train nnU-Net (``3d_fullres``, fold 0, CPU) for ``iterations`` steps over ``epochs`` epochs and validate.

    With ``train=False`` only the fingerprint, plans, preprocessing and split are made (for
    runs that need nnU-Net's plan but not a new nnU-Net model): ``validation_dir`` is then None.

    Returns ``plans`` (nnU-Net's ``3d_fullres`` configuration: spacing, patch_size, batch_size,
    architecture with its arch_kwargs), ``splits`` (``splits_final.json``), ``validation_dir``
    (``fold_0/validation`` with ``<case>.npz`` probabilities and ``<case>.nii.gz`` segmentations),
    ``iterations`` (training steps done), ``train_seconds`` (``initialize`` + ``run_training``:
    dataloaders, unpacking and checkpoints included) and ``phase_seconds`` (every phase).
    """
    raw_dataset_dir, work_dir = Path(raw_dataset_dir).resolve(), Path(work_dir).resolve()
    if not raw_dataset_dir.name.startswith(f"Dataset{dataset_id:03d}_"):
        raise ValueError(f"{raw_dataset_dir.name!r} is not named Dataset{dataset_id:03d}_<Name>")
    if not 1 <= epochs <= iterations:
        raise ValueError(f"need 1 <= epochs ({epochs}) <= iterations ({iterations})")
    raw_root = work_dir / "nnUNet_raw"
    raw_root.mkdir(parents=True, exist_ok=True)
    if raw_dataset_dir.parent != raw_root:
        (raw_root / raw_dataset_dir.name).symlink_to(raw_dataset_dir, target_is_directory=True)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(work_dir / name)  # nnU-Net reads these lazily, at each use
    os.environ["nnUNet_n_proc_DA"] = "1"  # the planner calls torch.set_num_threads(it): 0 would raise

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    extract_fingerprint_dataset(dataset_id, num_processes=1, show_progress_bar=False)
    seconds["fingerprint"] = time.perf_counter() - start
    start = time.perf_counter()
    _, plans_identifier = plan_experiment_dataset(dataset_id)
    seconds["plan"] = time.perf_counter() - start
    start = time.perf_counter()
    preprocess_dataset(
        dataset_id, plans_identifier, configurations=(CONFIGURATION,), num_processes=(1,), show_progress_bar=False
    )
    seconds["preprocess"] = time.perf_counter() - start

    preprocessed = work_dir / "nnUNet_preprocessed" / raw_dataset_dir.name
    plans = json.loads((preprocessed / f"{plans_identifier}.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer = nnUNetTrainerBenchmark({**plans, "continue_training": False}, CONFIGURATION, 0, dataset_json, CPU)
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations // epochs
    if not train:
        trainer.do_split()
        return {"plans": plans["configurations"][CONFIGURATION], "validation_dir": None, "train_seconds": None,
                "splits": json.loads((preprocessed / "splits_final.json").read_text()), "iterations": 0, "phase_seconds": seconds}
    os.environ["nnUNet_n_proc_DA"] = "0"  # SingleThreadedAugmenter: augmentation in this process
    _seed(seed)
    start = time.perf_counter()
    trainer.initialize()
    trainer.run_training()
    seconds["train"] = time.perf_counter() - start
    start = time.perf_counter()
    trainer.perform_actual_validation(save_probabilities=True)
    seconds["validation"] = time.perf_counter() - start

    return {
        "plans": plans["configurations"][CONFIGURATION],
        "splits": json.loads((preprocessed / "splits_final.json").read_text()),
        "validation_dir": Path(trainer.output_folder) / "validation",
        "train_seconds": seconds["train"],
        "iterations": trainer.current_epoch * trainer.num_iterations_per_epoch,
        "phase_seconds": seconds,
    }
