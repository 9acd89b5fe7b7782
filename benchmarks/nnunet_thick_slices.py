"""nnU-Net v2 and biasseg on one thick-slice dataset, both scored where it was annotated.

A generated nnU-Net-layout dataset whose cases each have their own in-plane (0.7–1.0 mm) and
slice (2.5–5 mm) spacing, an ellipsoid each (its true volume known: 4/3·π·abc). nnU-Net v2
plans, preprocesses and trains its default trainer (3d_fullres, fold 0, DC + CE, deep
supervision, test-time mirroring) for ``--iterations`` steps on the CPU
(:mod:`nnunet_side`); biasseg trains on the same fold, the same number of steps, with
nnU-Net's network widths, patch and batch size and its own plan (strides, spacing), with
``loss=ce_softdice`` and deep supervision, and predicts with ``predict.py``. Both sides'
probabilities are scored by ``score.py`` against the original labels of the fold's
validation cases: Dice, hard and soft volume against the reference and against the true
volume; and the wall time of each side's whole pipeline.

    python benchmarks/nnunet_thick_slices.py --iterations 250      # needs nnunet_side.py's packages
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from nnunet_side import train_nnunet

from biasseg.generated_folders import thick_slice_expected_ml, write_thick_slices

DATASET_ID = 991


def score(predictions: Path, labels: Path, output: Path) -> dict[str, dict]:
    """score.py's per-case rows (Dice, volumes in ml)."""
    subprocess.run([sys.executable, str(common.ROOT / "score.py"), f"predictions={predictions}", f"labels={labels}",
                    f"hydra.run.dir={output}"], check=True, capture_output=True, text=True)
    with open(output / "subjects.csv") as handle:
        return {row["subject"]: row for row in csv.DictReader(handle)}


def summary(rows: dict[str, dict]) -> dict[str, float]:
    """Mean Dice and mean relative volume errors (%) over the cases."""
    def relative(key: str, reference) -> float:
        return float(np.mean([100 * (float(r[key]) / reference(name, r) - 1) for name, r in rows.items()]))

    annotated = lambda name, r: float(r["volume_ref_ml"])  # noqa: E731
    expected = lambda name, r: thick_slice_expected_ml(int(name.split("_")[1]))  # noqa: E731
    return {"dice": float(np.mean([float(r["dice"]) for r in rows.values()])),
            "hard_vs_reference": relative("volume_pred_ml", annotated), "soft_vs_reference": relative("volume_pred_soft_ml", annotated),
            "hard_vs_true": relative("volume_pred_ml", expected), "soft_vs_true": relative("volume_pred_soft_ml", expected),
            "reference_vs_true": relative("volume_ref_ml", expected)}


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--cases", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=250, help="training steps of each side")
    parser.add_argument("--mirror", action="store_true", help="biasseg predicts with test-time mirroring on all axes, as nnU-Net validates")
    parser.add_argument("--no-nnunet", action="store_true", help="nnU-Net only plans and splits (an ablation of biasseg alone)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra train.py override for biasseg (repeatable)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nnunet_vs_biasseg_"))
    raw = write_thick_slices(work / "nnUNet_raw" / f"Dataset{DATASET_ID}_Thick", num_cases=args.cases)
    start = time.perf_counter()
    nn = train_nnunet(raw, work, DATASET_ID, args.iterations, epochs=1, seed=args.seed, train=not args.no_nnunet)
    nnunet_wall = time.perf_counter() - start
    plan = nn["plans"]
    arch = plan["architecture"]["arch_kwargs"]
    fold = nn["splits"][0]
    (work / "splits.json").write_text(json.dumps(nn["splits"]))
    labels, images = work / "val_labels", work / "val_images"
    labels.mkdir(), images.mkdir()
    for case in fold["val"]:
        (labels / f"{case}.nii.gz").symlink_to(raw / "labelsTr" / f"{case}.nii.gz")
        (images / f"{case}_0000.nii.gz").symlink_to(raw / "imagesTr" / f"{case}_0000.nii.gz")
    patch = list(reversed(plan["patch_size"]))  # nnU-Net's (z, y, x) → biasseg's (x, y, z)
    batch = int(plan["batch_size"])
    run = work / "biasseg_run"
    command = [sys.executable, str(common.ROOT / "train.py"), "data=folder", f"data.root={raw}", f"data.cache_dir={work / 'cache'}",
               f"data.splits_from={work / 'splits.json'}", "data.fold=0", f"data.patch_size=[{','.join(map(str, patch))}]",
               f"data.batch_size={batch}", f"data.steps_per_epoch={args.iterations}", "loss=ce_softdice",
               f"model.features=[{','.join(map(str, arch['features_per_stage']))}]", "model.deep_supervision=true",
               "trainer.max_epochs=1", "trainer.accelerator=cpu", f"seed={args.seed}",
               "trainer.enable_progress_bar=false", "callbacks.validation_figures=null", f"hydra.run.dir={run}", *args.set]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    subprocess.run([sys.executable, str(common.ROOT / "predict.py"), f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                    f"input={images}", f"output={work / 'biasseg_pred'}", "save_probabilities=true", "device=cpu",
                    *(["mirror_axes=[0,1,2]"] if args.mirror else []), f"hydra.run.dir={work / 'predict_log'}"], check=True, capture_output=True, text=True)
    biasseg_wall = time.perf_counter() - start
    ours = summary(score(work / "biasseg_pred", labels, work / "score_biasseg"))
    peer = summary(score(nn["validation_dir"], labels, work / "score_nnunet")) if nn["validation_dir"] else dict.fromkeys(ours)
    ours_plan = json.loads((run / "plan.json").read_text())
    print(common.describe_environment(common.select_device("cpu", True), "32"))
    print(f"{args.cases} cases, fold 0: {len(fold['train'])} training / {len(fold['val'])} validation; {args.iterations} steps each; "
          f"patch {patch}, batch {batch}, features {arch['features_per_stage']}; seed {args.seed}; biasseg mirroring {args.mirror}; "
          f"biasseg overrides {args.set or 'none'}")
    print(f"strides nnU-Net {[list(reversed(s)) for s in arch['strides'][1:]]}, biasseg {ours_plan['strides'][:len(arch['strides']) - 1]}; "
          f"spacing nnU-Net {list(reversed(plan['spacing']))}, biasseg {ours_plan['target_spacing']}")
    keys = list(ours)
    common.print_table(["measure (validation cases, original grid)", "biasseg", "nnU-Net v2"],
                       [[k, ours[k], peer[k]] for k in keys] + [["wall s, whole pipeline", biasseg_wall, nnunet_wall],
                                                                ["of which nnU-Net training", None, nn["train_seconds"]]])
    if peer["dice"] is not None:
        common.emit("nnunet_thick_slices_dice", ours["dice"], peer["dice"], "Dice", ours["dice"] / peer["dice"])


if __name__ == "__main__":  # nnU-Net's spawn pools re-import this module
    main()
