"""What fitting the volume calibration adds to an evaluate.py run.

Every validation (training's and ``evaluate.py``'s without a stored calibration) cross-fits the
recalibration maps and the conformal interval over the subjects' log-odds histograms
(:func:`biasseg.metrics.volume_quote.cross_fit`). This trains a one-epoch run on the default synthetic
data, then runs ``evaluate.py`` on it in this process ``--rounds`` times with
its stored calibration removed (so the fit happens), timing the whole evaluation and, inside it, the fit;
the *peer* is the evaluation without the fit (whole minus fit). Target: the fit adds ≤ 5 %.

    python benchmarks/volume_quote_fit.py --quick
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common
from hydra import compose, initialize_config_dir

import lightning_modules.segmentation_module as segmentation_module
from biasseg.pipelines.evaluate import evaluate
from biasseg.pipelines.train import train

CONFIGS = str(common.ROOT / "configs")


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--subjects", type=int, default=None, help="validation subjects; quick 6 (the default run's), else 24")
    args = parser.parse_args()
    subjects = args.subjects or (6 if args.quick else 24)
    work = Path(tempfile.mkdtemp(prefix="quote_fit_"))
    common_overrides = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    with initialize_config_dir(version_base="1.3", config_dir=CONFIGS):
        cfg = compose("train", overrides=[*common_overrides, "trainer.max_epochs=1", f"data.num_val={subjects}",
                                          "callbacks.validation_figures=null", "logger=none"])
    cfg.paths.output_dir = str(work / "run")
    train(cfg)
    (work / "run" / "checkpoints" / "volume_calibration.json").unlink()  # no stored calibration: evaluate.py fits one
    fitted: list[float] = []
    original = segmentation_module.cross_fit

    def timed_fit(*a, **k):
        start = time.perf_counter()
        result = original(*a, **k)
        fitted.append(time.perf_counter() - start)
        return result

    segmentation_module.cross_fit = timed_fit
    whole = []
    for round_ in range(args.rounds):
        with initialize_config_dir(version_base="1.3", config_dir=CONFIGS):
            ecfg = compose("evaluate", overrides=[*common_overrides, f"ckpt_path={work / 'run' / 'checkpoints' / 'last.ckpt'}"])
        ecfg.paths.output_dir = str(work / f"evaluate{round_}")
        start = time.perf_counter()
        evaluate(ecfg)
        whole.append(time.perf_counter() - start)
    fit = common.median(fitted[-args.rounds:])
    total = common.median(whole)
    print(f"{subjects} validation subjects of {list(cfg.data.shape)} voxels, {args.rounds} rounds (medians): "
          f"evaluate.py {total:.2f} s, of which the calibration fit {fit:.3f} s")
    common.emit_ratio("evaluate with the calibration fit vs without", total, total - fit, "s", 1 / 1.05, higher_is_better=False)


if __name__ == "__main__":
    main()
