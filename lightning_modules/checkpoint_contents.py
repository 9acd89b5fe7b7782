"""What a checkpoint from elsewhere may contain, checked before anything is built from it.

* **Config sections it may instantiate**: the stored ``loss`` may only name biasseg's losses,
  the stored ``data`` (evaluate.py) only biasseg's datamodules and TorchIO's random
  augmentations listed in :data:`AUGMENTATIONS` (plain-data arguments; other TorchIO classes
  read files, e.g. ``HistogramStandardization`` unpickles its landmarks, or call functions);
  no ``${…}`` interpolations. Hydra builds nested targets first, so every level is checked.
* **hyper_parameters**: only the model's own arguments, of the documented types and sizes.
* **inference_settings**: the preprocessing of new images, of the documented types.

Every problem is an :class:`InputError` naming the checkpoint and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torchio as tio
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

import datamodules
from biasseg import losses
from biasseg.errors import InputError
from biasseg.renamed_targets import current_targets
from datamodules.cases import NORMALISATION_SCHEMES
from datamodules.image_files import MEMORY_SHARE, physical_memory_bytes
from datamodules.segmentation import NORMALISATIONS, SegmentationDataModule
from lightning_modules.sliding_window import ACCUMULATIONS

AUGMENTATIONS = (
    tio.RandomFlip, tio.RandomAffine, tio.RandomElasticDeformation, tio.RandomAnisotropy, tio.RandomGamma, tio.RandomNoise,
    tio.RandomBiasField, tio.RandomBlur, tio.RandomMotion, tio.RandomGhosting, tio.RandomSpike, tio.RandomSwap,
)
MODULE_ARGUMENTS = ("in_channels", "num_classes", "features", "deep_supervision", "sliding_window", "class_names",
                    "preview_subjects", "soft_volume_margin_mm", "hypernet", "strides", "kernel_sizes", "regions",
                    "regions_class_order")
WINDOW_ARGUMENTS = ("patch_size", "overlap", "batch_size", "weighting", "mirror_axes", "accumulate")


def _loss_class(cls: type) -> bool:
    return any(cls is getattr(losses, name) for name in losses.__all__)


def _data_class(cls: type) -> bool:
    exported = [getattr(datamodules, name) for name in datamodules.__all__]
    return (cls in exported and issubclass(cls, SegmentationDataModule) and cls is not SegmentationDataModule) or cls in AUGMENTATIONS


ALLOWED = {"loss": _loss_class, "data": _data_class}


def allowed_target(target: object, section: str) -> bool:
    """Whether a checkpoint's ``section`` config may name ``target``."""
    if not isinstance(target, str) or not target.startswith(("biasseg.losses.", "datamodules.", "torchio.")):
        return False  # resolved only inside our losses, datamodules and TorchIO: nothing else gets imported
    try:
        cls = get_class(target)
    except Exception:
        return False
    return isinstance(cls, type) and ALLOWED[section](cls)


def check_targets(node: Any, where: str, source: str, section: str | None = None) -> None:
    """Refuse a config (from ``source``) that names a class its ``section`` (``loss`` or
    ``data``; the first part of ``where`` by default) may not build, or holds an interpolation."""
    section = section or where.split(".")[0].split("[")[0]
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_target_" and not allowed_target(value, section):
                kinds = "biasseg's losses" if section == "loss" else "biasseg's datamodules and TorchIO's random augmentations"
                raise InputError(
                    f"{source}: its stored config names {str(value)[:120]!r} at {where}._target_; only {kinds} are built from it"
                )
            check_targets(value, f"{where}.{key}", source, section)
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            check_targets(value, f"{where}[{index}]", source, section)
    elif isinstance(node, str) and "${" in node:
        raise InputError(f"{source}: its stored config holds an interpolation at {where} ({node[:80]!r}); refused")


def instantiate_section(config: Mapping, section: str, source: str):
    """``hydra.utils.instantiate`` of a checkpoint's ``loss`` or ``data`` section, after
    :func:`check_targets`; any failure to build it is one line naming the checkpoint."""
    if not isinstance(config, Mapping) or "_target_" not in config:
        raise InputError(f"{source}: its stored config has no {section} (_target_)")
    config = current_targets(config)
    check_targets(config, section, source)
    try:
        return instantiate(OmegaConf.create(dict(config)))
    except Exception as error:
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, InputError):
            raise InputError(f"{source}: its stored {section} config: {cause}") from None
        first = " ".join(str(cause).split())[:200]
        raise InputError(f"{source}: its stored {section} config cannot be built by this version of biasseg ({first})") from None


def _integer(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _numbers(value: object, length: int) -> bool:
    return (
        isinstance(value, (list, tuple)) and len(value) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _hypernet_ok(hypernet: object) -> bool:
    """None, or a mapping of ``alpha_range`` (2 numbers) and ``inference_alphas`` (1–64 numbers)."""
    if hypernet is None:
        return True
    if not isinstance(hypernet, Mapping) or set(hypernet) - {"alpha_range", "inference_alphas"}:
        return False
    alphas = hypernet.get("inference_alphas", [0.5])
    return (_numbers(hypernet.get("alpha_range", [0.05, 0.95]), 2) and isinstance(alphas, (list, tuple))
            and 1 <= len(alphas) <= 64 and _numbers(alphas, len(alphas)))


def _per_stage(value: object, stages: int, allowed: set[int]) -> bool:
    """None, or ``stages`` lists of three values from ``allowed`` (a U-Net's strides or kernels)."""
    return value is None or (isinstance(value, (list, tuple)) and len(value) == stages and all(
        isinstance(v, (list, tuple)) and len(v) == 3 and all(_integer(x, 1, 3) and x in allowed for x in v) for v in value))


def window_problem(window: object, features: list[int]) -> str | None:
    """What is wrong with sliding-window settings, including memory they would take, or None."""
    if not isinstance(window, Mapping) or set(window) - set(WINDOW_ARGUMENTS):
        return f"sliding_window must be a mapping of {list(WINDOW_ARGUMENTS)}, got {str(window)[:80]}"
    patch = window.get("patch_size")
    if not (isinstance(patch, (list, tuple)) and len(patch) == 3 and all(_integer(p, 1, 4096) for p in patch)):
        return f"sliding_window.patch_size must be three positive ints, got {str(patch)[:60]}"
    batch = window.get("batch_size", 1)
    if not _integer(batch, 1, 4096):
        return f"sliding_window.batch_size must be a positive int, got {str(batch)[:40]}"
    mirror = window.get("mirror_axes", [])
    if not (isinstance(mirror, (list, tuple)) and len(set(mirror)) == len(mirror) and all(_integer(a, 0, 2) for a in mirror)):
        return f"sliding_window.mirror_axes must be distinct axes among 0, 1, 2, got {str(mirror)[:40]}"
    if window.get("accumulate", "auto") not in ACCUMULATIONS:
        return f"sliding_window.accumulate must be one of {list(ACCUMULATIONS)}, got {str(window.get('accumulate'))[:40]}"
    overlap = window.get("overlap", 0.5)
    if not (isinstance(overlap, (int, float)) and 0 <= overlap < 1):
        return f"sliding_window.overlap must be in [0, 1), got {str(overlap)[:40]}"
    # the first stage's activations dominate: a few float32 copies of (batch, features[0], *patch)
    need = math.prod(patch) * batch * max(features[0], 1) * 4 * 8
    memory = physical_memory_bytes()
    if memory is not None and need > MEMORY_SHARE * memory:
        return f"sliding_window {list(patch)} × batch {batch} would need about {need / 2**30:.0f} GB, more than this machine has"
    return None


def module_arguments(hparams: object, source: str) -> dict:
    """The checkpoint's ``hyper_parameters``, checked to be SegmentationModule arguments of
    the documented types and sizes."""
    if not isinstance(hparams, Mapping):
        raise InputError(f"{source}: hyper_parameters must be a mapping")
    unknown = sorted(set(hparams) - set(MODULE_ARGUMENTS))
    if unknown:
        raise InputError(f"{source}: unknown hyper_parameters {unknown[:5]} (this version of biasseg knows {list(MODULE_ARGUMENTS)})")
    features = hparams.get("features", [8, 16, 32, 64])
    checks = {
        "in_channels": _integer(hparams.get("in_channels"), 1, 1024),
        "num_classes": _integer(hparams.get("num_classes"), 2, 256),
        "features": isinstance(features, (list, tuple)) and 2 <= len(features) <= 8 and all(_integer(f, 1, 4096) for f in features),
        "deep_supervision": isinstance(hparams.get("deep_supervision", False), bool),
        "preview_subjects": _integer(hparams.get("preview_subjects", 2), 0, 1024),
        "soft_volume_margin_mm": _numbers([hparams.get("soft_volume_margin_mm", 10.0)], 1) and hparams.get("soft_volume_margin_mm", 10.0) >= 0,
        "hypernet": _hypernet_ok(hparams.get("hypernet")),
        "regions": hparams.get("regions") is None or (isinstance(hparams["regions"], (list, tuple)) and 1 <= len(hparams["regions"]) <= 255
                                                       and all(isinstance(r, (list, tuple)) and 1 <= len(r) <= 255
                                                               and all(_integer(v, 1, 255) for v in r) for r in hparams["regions"])),
        "regions_class_order": hparams.get("regions_class_order") is None or (
            isinstance(hparams["regions_class_order"], (list, tuple)) and all(_integer(v, 1, 255) for v in hparams["regions_class_order"])),
        "strides": _per_stage(hparams.get("strides"), len(features) - 1 if isinstance(features, (list, tuple)) else -1, {1, 2}),
        "kernel_sizes": _per_stage(hparams.get("kernel_sizes"), len(features) if isinstance(features, (list, tuple)) else -1, {1, 3}),
        "class_names": hparams.get("class_names") is None or (
            isinstance(hparams["class_names"], (list, tuple)) and all(isinstance(n, str) for n in hparams["class_names"])),
    }
    wrong = [name for name, ok in checks.items() if not ok]
    if wrong:
        raise InputError(f"{source}: hyper_parameters {wrong} are missing or not of the documented type and range")
    if hparams.get("sliding_window") is not None:
        problem = window_problem(hparams["sliding_window"], list(features))
        if problem:
            raise InputError(f"{source}: {problem}")
    return dict(hparams)


def inference_settings_problem(settings: object, in_channels: int) -> str | None:
    """What is wrong with a checkpoint's ``inference_settings`` (how prediction preprocesses
    new images), or None."""
    if not isinstance(settings, dict):
        return f"a {type(settings).__name__}, not a mapping"
    spacing = settings.get("target_spacing")
    if spacing is not None and not (_numbers(spacing, 3) and min(spacing) > 0):
        return f"target_spacing must be three positive numbers (mm), got {str(spacing)[:80]}"
    for key in ("channel_names", "class_names"):
        names = settings.get(key)
        if names is not None and not (isinstance(names, list) and len(names) <= 1024 and all(isinstance(n, str) for n in names)):
            return f"{key} must be a list of names, got {str(names)[:80]}"
    if settings.get("channel_names") is not None and len(settings["channel_names"]) != in_channels:
        return f"channel_names names {len(settings['channel_names'])} channels, the model reads {in_channels}"
    normalization = settings.get("normalization")
    per_channel = isinstance(normalization, list) and len(normalization) == in_channels and all(
        n in NORMALISATION_SCHEMES for n in normalization)
    if normalization not in (None, *NORMALISATIONS) and not per_channel:
        return (f"normalization must be one of {NORMALISATIONS} or a list of {NORMALISATION_SCHEMES} per channel, "
                f"got {str(normalization)[:60]!r}")
    if normalization == "ct" or (per_channel and "ct" in normalization):
        intensity = settings.get("intensity")
        keys = ("shift", "scale", "lower", "upper")
        if not isinstance(intensity, dict) or not all(_numbers(intensity.get(k), in_channels) for k in keys):
            return f"normalization=ct needs intensity {{{', '.join(keys)}}}, {in_channels} number(s) each"
        if min(intensity["scale"]) <= 0:
            return "intensity scale must be positive"
    return None


def state_dict_problem(build, state_dict: Mapping) -> str | None:
    """Whether ``state_dict`` has exactly the tensors, of the shapes, that ``build()`` (the
    model its hyper_parameters describe) expects — checked on the meta device, so a crafted
    ``features`` list allocates nothing."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if len(given) != len(state_dict):
        return "non-tensor entries in state_dict"
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    wrong = [k for k in expected if expected[k] != given[k]]
    if wrong:
        return f"{wrong[0]} has shape {given[wrong[0]]}, the model needs {expected[wrong[0]]}"
    return None


def split_record_problem(record: object) -> str | None:
    """What is wrong with a checkpoint's ``data_split`` (``{"dataset": folder, "train": [case
    names], "val": [case names]}``, see ``FolderDataModule.split_record``), or None."""
    if not isinstance(record, dict) or not isinstance(record.get("dataset"), str):
        return "data_split must be a mapping with the dataset folder"
    for key in ("train", "val"):
        names = record.get(key)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return f"data_split.{key} must be a list of case names"
    return None
