"""Check the volume a user quotes, as a new user meets it: a folder dataset, then new scans.

    python scripts/volume_quote_check.py --train 36 --test 40 --work /tmp/quote [-- train.py overrides…]

Writes a Decathlon-layout folder of ``--train`` generated subjects (spheres whose labels are
drawn from a known uncertainty model, each subject its own anisotropic spacing, so every
expected volume is known), trains ``python train.py data=folder`` on it with the defaults (and
any overrides after ``--``), then runs ``predict.py`` on ``--test`` further subjects and
compares ``volumes.csv`` with their expected volumes and with their drawn labels, for every
recalibration (``calibration=none|temperature|platt|isotonic``): the interval's coverage and
width, the quoted volume's mean (and mean absolute) relative error; the raw soft and mask
volumes' errors and the Poisson-binomial interval's coverage. A work folder trained in
before is predicted again without training. Prints one JSON object (also written to
``<work>/quote_check.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from datamodules.synthetic_volumes import generate_case

ROOT = Path(__file__).resolve().parent.parent  # the checkout: train.py, predict.py


def write_case(rng: np.random.Generator, args: argparse.Namespace, image_path: Path, label_path: Path) -> float:
    """One subject at a spacing of its own; its expected volume (ml)."""
    spacing = (rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2), rng.uniform(1.5, 3.0))
    field = np.asarray(args.field_mm, dtype=float)
    shape = tuple(int(round(f / s)) for f, s in zip(field, spacing))
    case = generate_case(rng, shape, spacing, num_structures=1, radius_mm=tuple(args.radius_mm), sigma_mm=args.sigma,
                         kind=args.kind)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(case.image, affine), image_path)
    nib.save(nib.Nifti1Image(case.label.astype(np.uint8), affine), label_path)
    return float(case.expected_volume_ml()[0])


def write_dataset(work: Path, args: argparse.Namespace) -> dict[str, float]:
    """The training folder and the test scans; expected volumes of the test scans."""
    rng = np.random.default_rng(args.seed)
    raw, test = work / "dataset", work / "test"
    for folder in (raw / "imagesTr", raw / "labelsTr", test / "images", test / "labels"):
        folder.mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(args.train):
        name = f"case_{i:03d}.nii.gz"
        write_case(rng, args, raw / "imagesTr" / name, raw / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (raw / "dataset.json").write_text(json.dumps({
        "name": "QuoteCheck", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "structure"},
        "numTraining": args.train, "training": training}))
    expected = {}
    for i in range(args.test):
        name = f"new_{i:03d}"
        expected[name] = write_case(rng, args, test / "images" / f"{name}.nii.gz", test / "labels" / f"{name}.nii.gz")
    return expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=36, help="training-folder subjects (the split holds out 20 %)")
    parser.add_argument("--test", type=int, default=40, help="new scans predicted afterwards")
    parser.add_argument("--kind", default="voxel", choices=("voxel", "boundary"), help="label uncertainty model")
    parser.add_argument("--sigma", type=float, default=1.5, help="label uncertainty (mm)")
    parser.add_argument("--radius-mm", type=float, nargs=2, default=(5.0, 9.0))
    parser.add_argument("--field-mm", type=float, nargs=3, default=(40.0, 40.0, 40.0))
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--work", type=Path, required=True, help="an empty folder for data, run and predictions")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()
    work = args.work.resolve()
    expected = write_dataset(work, args)  # the same files again for a work folder already trained in (same seed)
    started = time.time()
    if not (work / "run" / "checkpoints" / "last.ckpt").exists():
        subprocess.run([sys.executable, str(ROOT / "train.py"), "data=folder", f"data.root={work / 'dataset'}",
                        f"data.cache_dir={work / 'cache'}", f"hydra.run.dir={work / 'run'}", "trainer.enable_progress_bar=false",
                        *args.overrides], check=True, cwd=ROOT)
    trained = time.time() - started
    label_ml = {}
    for name in expected:
        label = nib.load(work / "test" / "labels" / f"{name}.nii.gz")
        label_ml[name] = float((label.get_fdata() > 0).sum() * np.prod(label.header.get_zooms()[:3]) / 1000)
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    result = {"train_subjects": args.train, "test_scans": args.test, "kind": args.kind, "sigma_mm": args.sigma,
              "overrides": args.overrides, "global_step": metrics["global_step"], "train_seconds": round(trained),
              "verdict": metrics.get("calibration_verdict"), "methods": {}}
    for method in ("none", "temperature", "platt", "isotonic"):
        output = work / f"predictions_{method}"
        subprocess.run([sys.executable, str(ROOT / "predict.py"), f"ckpt_path={work / 'run' / 'checkpoints' / 'last.ckpt'}",
                        f"input={work / 'test' / 'images'}", f"output={output}", "device=cpu", f"calibration={method}",
                        "overwrite=true", f"hydra.run.dir={work / 'predict_log'}"], check=True, cwd=ROOT, capture_output=True)
        with open(output / "volumes.csv") as handle:
            rows = {r["case"]: r for r in csv.DictReader(handle)}

        def share(target: dict[str, float]) -> float:
            return float(np.mean([float(rows[n]["volume_low_ml"]) <= v <= float(rows[n]["volume_high_ml"])
                                  for n, v in target.items()]))

        def error(column: str) -> float:
            return float(np.mean([float(rows[n][column]) / v - 1 for n, v in expected.items()]))

        result["methods"][method] = {
            "coverage_vs_expected": share(expected), "coverage_vs_label": share(label_ml),
            "mean_relative_width": float(np.mean([(float(r["volume_high_ml"]) - float(r["volume_low_ml"])) / float(r["volume_ml"])
                                                  for r in rows.values()])),
            "quote_vs_expected": error("volume_ml"), "quote_abs_error_vs_expected":
                float(np.mean([abs(float(rows[n]["volume_ml"]) / v - 1) for n, v in expected.items()])),
        }
    result["raw_soft_vs_expected"] = error("soft_volume_ml")
    result["mask_vs_expected"] = error("mask_volume_ml")
    result["sd_coverage_vs_expected"] = float(np.mean([abs(float(rows[n]["soft_volume_ml"]) - v) <= 1.645 * float(rows[n]["volume_sd_ml"])
                                                       for n, v in expected.items()]))
    (work / "quote_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
