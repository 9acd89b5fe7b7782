"""Open checkpoints someone gave us, and rebuild a trained model from one.

A checkpoint is untrusted input: people share them, and a model zoo is exactly what this
project's users build. Three rules:

* **No pickled code.** Every checkpoint is read with ``torch.load(weights_only=True)``
  (tensors and plain data only), here and when Lightning resumes a run; a file that needs
  more is refused with a one-line message. Checkpoints written by train.py hold only plain
  data, so every one of them loads; ``scripts/convert_trusted_checkpoint.py`` rewrites one
  from a source you trust that holds other objects (numpy values, OmegaConf nodes).
* **Only our classes.** The run config stored in a checkpoint is instantiated with Hydra (the
  loss; evaluate.py also the data), so every ``_target_`` in it must be one of biasseg's
  losses or datamodules or a TorchIO transform (:func:`check_targets`); interpolations
  (``${…}``) are refused too.
* **Only our files.** The checkpoint's callback state names checkpoint files that Lightning
  may later delete; entries outside the checkpoint's own folder are dropped on resume
  (:func:`lightning_modules.callback_state.confine_callback_state`).
"""

from __future__ import annotations

import math
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchio as tio
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

import datamodules
import losses
from datamodules.segmentation import NORMALISATIONS
from input_errors import InputError
from lightning_modules.segmentation_module import SegmentationModule

CONVERT_HINT = "if you trust its source, convert it once: python scripts/convert_trusted_checkpoint.py IN OUT"
# What a checkpoint's hyper_parameters may set (SegmentationModule's arguments other than the
# loss and the optimisation, which are not plain data).
MODULE_ARGUMENTS = ("in_channels", "num_classes", "features", "deep_supervision", "sliding_window", "class_names", "preview_subjects")


@dataclass
class TrainedModel:
    """A trained module and how its data was preprocessed (``inference_settings``, see
    ``SegmentationDataModule.inference_settings``)."""

    module: SegmentationModule
    inference_settings: dict


def load_untrusted(path: str | Path, what: str = "ckpt_path", mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` with one-line errors naming ``what`` and the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{what}={path}: no such file")
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive with an index at its end
        raise InputError(f"{what}={path}: not a readable PyTorch checkpoint (not torch.save's zip format: truncated, damaged or another file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        detail = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        raise InputError(
            f"{what}={path}: refused: it holds Python objects that loading would have to run ({detail[:160]}); "
            f"{CONVERT_HINT}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{what}={path}: not a readable PyTorch checkpoint (truncated or damaged? {first[:160]})") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"{what}={path}: not a checkpoint (a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """A checkpoint written by train.py, read safely; clear errors for anything else."""
    checkpoint = load_untrusted(ckpt_path)
    kinds = {"run_config": dict, "state_dict": dict, "hyper_parameters": dict}
    wrong = [k for k, kind in kinds.items() if not isinstance(checkpoint.get(k), kind)]
    if wrong:
        raise InputError(f"ckpt_path={ckpt_path}: not a checkpoint written by train.py (no {', '.join(wrong)})")
    return checkpoint


def allowed_target(target: object) -> bool:
    """Whether a checkpoint may name ``target``: biasseg's losses and datamodules, and TorchIO
    transforms (whose arguments are plain data) other than ``Lambda`` (which calls a function)."""
    if not isinstance(target, str):
        return False
    module, _, name = target.rpartition(".")
    if module == "losses":
        return name in losses.__all__
    if module == "datamodules":
        return name in datamodules.__all__ and name != "DatasetError"
    if target.split(".")[0] == "torchio":
        try:
            cls = get_class(target)
        except Exception:
            return False
        return isinstance(cls, type) and issubclass(cls, tio.Transform) and not issubclass(cls, tio.Lambda)
    return False


def check_targets(node: Any, where: str, source: str) -> None:
    """Refuse a config (from ``source``) that names a class outside :func:`allowed_target` or
    holds an interpolation, anywhere under ``where``."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_target_" and not allowed_target(value):
                raise InputError(
                    f"{source}: its stored config names {str(value)[:120]!r} at {where}._target_; only biasseg's losses, "
                    "datamodules and TorchIO transforms are built from a checkpoint"
                )
            check_targets(value, f"{where}.{key}", source)
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            check_targets(value, f"{where}[{index}]", source)
    elif isinstance(node, str) and "${" in node:
        raise InputError(f"{source}: its stored config holds an interpolation at {where} ({node[:80]!r}); refused")


def instantiate_from_checkpoint(config: Mapping, where: str, source: str):
    """``hydra.utils.instantiate`` of a checkpoint's config section, after :func:`check_targets`."""
    check_targets(config, where, source)
    return instantiate(OmegaConf.create(dict(config)))


def module_arguments(hparams: Mapping, source: str) -> dict:
    """The checkpoint's ``hyper_parameters``, checked to be SegmentationModule arguments of plain data."""
    unknown = sorted(set(hparams) - set(MODULE_ARGUMENTS))
    if unknown:
        raise InputError(f"{source}: unknown hyper_parameters {unknown[:5]} (this version of biasseg knows {list(MODULE_ARGUMENTS)})")
    missing = [k for k in ("in_channels", "num_classes") if k not in hparams]
    if missing:
        raise InputError(f"{source}: hyper_parameters lack {missing}")
    return dict(hparams)


def load_trained(checkpoint: dict, sliding_window: dict | None = None, source: str = "checkpoint") -> TrainedModel:
    """The module with the checkpoint's weights (eval mode, on the CPU).

    ``sliding_window`` (``SlidingWindow`` keyword arguments) replaces the validation
    settings the model was trained with; None keeps them. ``source`` names the checkpoint in
    error messages.
    """
    hparams = module_arguments(checkpoint.get("hyper_parameters", {}), source)
    if sliding_window is not None:
        hparams["sliding_window"] = {**(hparams.get("sliding_window") or {}), **sliding_window}
    loss_config = checkpoint["run_config"].get("loss")
    if not isinstance(loss_config, Mapping) or "_target_" not in loss_config:
        raise InputError(f"{source}: its stored config has no loss (_target_)")
    loss = instantiate_from_checkpoint(loss_config, "loss", source)
    try:
        module = SegmentationModule(loss=loss, **hparams)
    except InputError as error:
        raise InputError(f"{source}: its hyper_parameters are unusable: {error}") from None
    except (TypeError, ValueError) as error:
        raise InputError(f"{source}: its hyper_parameters are unusable ({type(error).__name__}: {str(error)[:200]})") from None
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, KeyError) as error:
        first = str(error).strip().splitlines()[0][:200]
        raise InputError(f"{source}: its weights do not fit the model its hyper_parameters describe ({first})") from None
    module.eval()
    settings = checkpoint.get("inference_settings") or {}
    problem = inference_settings_problem(settings, int(hparams["in_channels"]))
    if problem:
        raise InputError(f"{source}: its inference_settings are unusable: {problem}")
    return TrainedModel(module, settings)


def _numbers(value: object, length: int) -> bool:
    return (
        isinstance(value, list) and len(value) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def inference_settings_problem(settings: object, in_channels: int) -> str | None:
    """What is wrong with a checkpoint's ``inference_settings`` (how prediction preprocesses
    new images), or None."""
    if not isinstance(settings, dict):
        return f"a {type(settings).__name__}, not a mapping"
    spacing = settings.get("target_spacing")
    if spacing is not None and not (_numbers(spacing, 3) and min(spacing) > 0):
        return f"target_spacing must be three positive numbers (mm), got {str(spacing)[:80]}"
    if settings.get("normalization") not in (None, *NORMALISATIONS):
        return f"normalization must be one of {NORMALISATIONS}, got {str(settings.get('normalization'))[:40]!r}"
    if settings.get("normalization") == "ct":
        intensity = settings.get("intensity")
        keys = ("shift", "scale", "lower", "upper")
        if not isinstance(intensity, dict) or not all(_numbers(intensity.get(k), in_channels) for k in keys):
            return f"normalization=ct needs intensity {{{', '.join(keys)}}}, {in_channels} number(s) each"
        if min(intensity["scale"]) <= 0:
            return "intensity scale must be positive"
    return None
