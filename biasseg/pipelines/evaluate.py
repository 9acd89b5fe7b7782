"""Evaluate a trained checkpoint on whole volumes, measured where each case was annotated.

    python evaluate.py ckpt_path=logs/train/runs/<run>/checkpoints/best-….ckpt
    python evaluate.py ckpt_path=… data=folder data.root=/data/OtherDataset        # every case of another dataset
    python evaluate.py 'ckpt_path=logs/study/high_uncertainty/ce/seed*/checkpoints/last.ckpt'   # a deep ensemble
    python evaluate.py ckpt_path=…/hypernet.ckpt alpha=0.3     # a Tversky hypernetwork at one α

Writes ``metrics.json``, ``subjects.csv``, ``lesions.csv`` (``lesions=…``, :mod:`biasseg.metrics.lesions`)
and ``calibration.csv`` (the format of training's validation) into ``logs/evaluate/runs/<timestamp>/``; the post-hoc remedies' temperature
and threshold are fitted on the evaluated subjects, as in training's validation.

Which data, read how: without ``data=…`` the checkpoint's own data config, with its split
(``splits.json`` of the training run, when it still exists). With ``data=…`` another dataset
is read *as the model was trained to read it* (its target spacing, crop, normalisation and
its training statistics, channel order): its own median spacing or the default normalisation
never replace the model's, and a dataset whose channels or classes differ from the model's
is refused. ``cases`` chooses what is scored: ``auto`` = the training split's validation cases
on the training dataset, every case on another one; ``all``; ``val`` (the split drawn by
``data.*``'s split keys). No model is scored on a case it trained on: a case in the training
cases of any checkpoint (an ensemble's members included) is refused, naming both.
``cross_validation=true`` with the fold models (``'ckpt_path=…/fold*/checkpoints/last.ckpt'``)
scores each case with the one fold model that validated on it and pools the rows
(nnU-Net's cross-validation summary), instead of averaging them as an ensemble.
The volume to quote (:mod:`biasseg.metrics.volume_quote`): ``calibration=auto`` applies the
recalibration and interval stored beside the checkpoint (``volume_calibration.json``, fitted
on the training run's validation subjects, refused for other weights), so ``interval_coverage``
and ``quote_…`` biases are measured on cases the calibration never saw; without one (or with
several checkpoints) they are cross-fitted on the evaluated cases. ``calibration=none|
temperature|platt|isotonic`` picks the method.
``epoch`` and ``global_step`` in ``metrics.json`` are the checkpoint's (lists, one per member,
for an ensemble: several checkpoints, whose probability maps are averaged; the data config
is the first one's).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from biasseg.callbacks import ResultsWriter
from biasseg.cli import CONFIGS, check_command_line
from biasseg.errors import InputError, exit_on_input_error
from biasseg.loggers.run_log import build_trainer, route_library_output
from datamodules.preprocessing_cache import default_cache_dir
from lightning_modules.calibration_file import resolve_calibration
from lightning_modules.checkpoint_contents import check_targets, instantiate_section, split_record_problem
from lightning_modules.checkpoints import load_ensemble, read_checkpoints
from lightning_modules.segmentation_module import quote_settings

# A checkpoint's data config decides what is read; these keys, how it is read, stay the user's.
CHECKPOINT_DATA_OVERRIDES = {"allow_outside_root": False, "num_workers": "auto"}
CASES = ("auto", "all", "val")
log = logging.getLogger(__name__)


def data_config(cfg: DictConfig, run_data: object, source: str) -> DictConfig:
    """``cfg.data`` if given, else the training data stored in the checkpoint (``source``),
    which may only name biasseg's datamodules and TorchIO's random augmentations, and whose
    settings of where to write and how many processes to start are this user's (the cache
    folder, workers) or the safe defaults (files inside the dataset folder only). Folder data
    of the training dataset reuses the training run's split, and ``cases`` (see the module
    docstring) picks the cases; the split used is written beside the outputs."""
    stored = run_data if isinstance(run_data, dict) else {}
    if cfg.get("data") is not None:
        data = OmegaConf.to_container(cfg.data, resolve=True)
    else:
        if "_target_" not in stored:
            raise InputError(f"{source}: its stored config has no data section (_target_); give data=…")
        check_targets(stored, "data", source)
        data = dict(stored)
        data.update({key: value for key, value in CHECKPOINT_DATA_OVERRIDES.items() if key in data})
        if "cache_dir" in data:
            data["cache_dir"] = default_cache_dir()
    cases = cfg.get("cases", "auto")
    if cases not in CASES:
        raise InputError(f"cases must be one of {CASES}, got {cases!r}")
    if "splits_file" in data:  # folder data
        same_dataset = same_folder(data.get("root"), stored.get("root"))
        if cases == "all" or (cases == "auto" and not same_dataset):
            data["validate"] = "all"
        trained_split = stored.get("splits_file")
        if same_dataset and not data.get("splits_from") and isinstance(trained_split, str) and Path(trained_split).is_file():
            data["splits_from"] = trained_split
        data["splits_file"] = str(Path(cfg.paths.output_dir) / "splits.json")
    elif cases == "all":
        raise InputError("cases=all scores every case of a dataset folder (data=folder); this data has only its split")
    return OmegaConf.create(data)


def same_folder(a: object, b: object) -> bool:
    """Whether two configured dataset folders are one folder."""
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def refuse_training_cases(datamodule: object, checkpoints: list[tuple[Path, dict]]) -> None:
    """One line naming a scored case and the checkpoint that trained on it, if there is one:
    a score on a training case is a leaked score (an ensemble of fold models on one fold's
    validation cases, a model on every case of its own dataset)."""
    split, layout = getattr(datamodule, "split", None), getattr(datamodule, "layout", None)
    if split is None or layout is None:
        return
    scored = set(split["val"])
    for path, checkpoint in checkpoints:
        record = checkpoint.get("data_split")
        if record is None:
            continue  # written before biasseg recorded it
        problem = split_record_problem(record)
        if problem:
            raise InputError(f"ckpt_path={path}: {problem}")
        if same_folder(record["dataset"], str(layout.root)):
            trained_on = sorted(scored & set(record["train"]))
            if trained_on:
                more = f" (and {len(trained_on) - 1} more)" if len(trained_on) > 1 else ""
                raise InputError(
                    f"case {trained_on[0]}{more} of {layout.root} is a training case of ckpt_path={path}: a score on it "
                    "would be leaked; score the cases no member trained on (cases=val with data.splits_from=…), "
                    "another dataset, or each fold on its own validation cases (cross_validation=true)")


def fold_cases(checkpoints: list[tuple[Path, dict]]) -> dict[str, int]:
    """``{case: index of the checkpoint that validated on it}`` for a cross-validation: every
    checkpoint a fold model of one dataset (its stored ``data_split``), no case in two folds'
    validation cases, none a training case of the model that scores it."""
    folds: dict[str, int] = {}
    dataset = None
    for index, (path, checkpoint) in enumerate(checkpoints):
        record = checkpoint.get("data_split")
        problem = "it stores no data_split (trained before biasseg recorded it, or not on a folder)" if record is None \
            else split_record_problem(record)
        if problem:
            raise InputError(f"ckpt_path={path}: cross_validation=true needs each fold's split; {problem}")
        if dataset is not None and not same_folder(record["dataset"], dataset):
            raise InputError(f"ckpt_path={path}: trained on {record['dataset']}, the first fold on {dataset}; "
                             "a cross-validation's folds share one dataset")
        dataset = record["dataset"]
        for case in record["val"]:
            if case in folds:
                raise InputError(f"ckpt_path={path}: case {case} is also a validation case of "
                                 f"ckpt_path={checkpoints[folds[case]][0]}; cross-validation folds do not overlap")
            if case in record["train"]:
                raise InputError(f"ckpt_path={path}: case {case} is both a training and a validation case")
            folds[case] = index
    return folds


def plain_int(value: object) -> int | None:
    """An int stored in a checkpoint (a tensor or number), else None."""
    try:
        return int(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        return None


SUMMARY = (  # what the closing line shows: (metrics.json key, label, format)
    ("val/dice", "Dice", "{:.3f}"),
    ("val/relative_volume_bias", "argmax ΔV/ref", "{:+.1%}"),
    ("val/soft_relative_volume_bias", "soft ΔV/ref", "{:+.1%}"),
    ("val/relative_soft_expected_volume_bias", "soft vs expected", "{:+.1%}"),
    ("val/quote_relative_volume_bias", "quoted ΔV/ref", "{:+.1%}"),
    ("val/interval_coverage", "interval coverage", "{:.0%}"),
    ("val/interval_relative_width", "width", "{:.0%}"),
    ("val/ece", "pooled ECE", "{:.4f}"),
    ("val/ged", "GED", "{:.3f}"),
)


def summary_line(summary: dict[str, float]) -> str:
    """The headline numbers of an evaluation in one line (biases are means over subjects)."""
    return " · ".join(f"{label} {fmt.format(summary[key])}" for key, label, fmt in SUMMARY if key in summary)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate the checkpoint ``cfg.ckpt_path``; returns the summary (``val/…`` keys)."""
    route_library_output()
    if not cfg.get("ckpt_path"):
        raise InputError("evaluate.py needs ckpt_path=PATH (or several: a glob pattern or [A,B,…], averaged as an ensemble)")
    checkpoints = read_checkpoints(cfg.ckpt_path)
    source = f"ckpt_path={checkpoints[0][0]}"
    folds = fold_cases(checkpoints) if cfg.get("cross_validation") else None
    config = data_config(cfg, checkpoints[0][1]["run_config"].get("data"), source)  # the first member's data
    if folds is not None:
        if "validate" not in config and "splits_file" not in config:
            raise InputError("cross_validation=true needs the fold models' folder dataset (data=folder)")
        config.validate = sorted(folds)
    datamodule = instantiate(config) if cfg.get("data") is not None else instantiate_section(config, "data", source)
    window = {"overlap": datamodule.val_patch_overlap, "batch_size": datamodule.val_batch_size, "weighting": datamodule.val_weighting,
              "mirror_axes": list(cfg.mirror_axes) if cfg.get("mirror_axes") is not None else datamodule.val_mirror_axes,
              "accumulate": datamodule.val_accumulate}
    trained = load_ensemble(checkpoints, sliding_window=window, alpha=cfg.get("alpha"))  # the model's own patch
    if trained.inference_settings:  # written by every train.py run; the model's preprocessing, never this data's own
        datamodule.adopt_preprocessing(trained.inference_settings, source)
    if folds is None:
        refuse_training_cases(datamodule, checkpoints)
    else:  # each case by the one fold model that did not train on it, pooled (nnU-Net's cross-validation summary)
        trained.predictor.case_members = folds
    trained.module.predictor = trained.predictor
    origin = {key: [plain_int(checkpoint.get(key)) for _, checkpoint in checkpoints] for key in ("epoch", "global_step")}
    origin["ckpt_path"] = [str(path) for path, _ in checkpoints]
    if len(checkpoints) == 1:  # one checkpoint: plain values, as training's metrics.json
        origin = {key: value[0] for key, value in origin.items()}
    if cfg.get("alpha") is not None:
        origin["alpha"] = float(cfg.alpha)
    if folds is not None:
        origin["cross_validation"] = True
    origin["preprocessing"] = {key: trained.inference_settings.get(key) for key in ("target_spacing", "crop_nonzero", "normalization")}
    calibration, method, note = resolve_calibration(str(cfg.get("calibration", "auto")), cfg.get("calibration_file"),
                                                    [path for path, _ in checkpoints], trained.module.net, trained.module.class_names)
    trained.module.stored_calibration = calibration
    if calibration is None:  # the quote is cross-fitted on the evaluated cases themselves (metrics.volume_quote)
        try:  # with the run's own settings (method, alpha, folds, target); an older run's are the defaults
            trained.module.volume_quote = quote_settings(checkpoints[0][1]["run_config"].get("volume_quote"))
        except InputError as error:
            raise InputError(f"{checkpoints[0][0]}: {error}") from None
        if cfg.get("calibration") == "none":
            trained.module.volume_quote = {**trained.module.volume_quote, "method": "none"}
        note += f"; quote and interval cross-fitted on the evaluated cases ({trained.module.volume_quote['method']})"
    log.info(f"volume calibration: {note}")
    origin["volume_calibration"] = {"method": method if calibration is not None else trained.module.volume_quote["method"],
                                    "stored": calibration is not None, "note": note}
    trained.module.measure_lesions(cfg.get("lesions"))
    writer = ResultsWriter(cfg.paths.output_dir, fields=origin)
    trainer = build_trainer(cfg.trainer, [writer], [])
    trainer.validate(trained.module, datamodule=datamodule, verbose=False)  # every value is in metrics.json
    return {f"val/{k}": v for k, v in (trained.module.validation_summary or {}).items()}


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    summary = exit_on_input_error(lambda: evaluate(cfg))
    print(f"{summary_line(summary)}\nmetrics.json, subjects.csv, lesions.csv, calibration.csv: {cfg.paths.output_dir}")


def cli() -> None:
    """``python evaluate.py …`` and the console script ``biasseg-evaluate``: misspelt keys and ``--help`` first, then Hydra."""
    check_command_line("evaluate")
    main()
