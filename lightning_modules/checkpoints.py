"""Open checkpoints someone gave us, and rebuild a trained model from one.

A checkpoint is untrusted input: people share them, and a model zoo is exactly what this
project's users build. Three rules:

* **No pickled code.** Every checkpoint is read with ``torch.load(weights_only=True)``
  (tensors and plain data only), here and when Lightning resumes a run; a file that needs
  more is refused with a one-line message. Checkpoints written by train.py hold only plain
  data, so every one of them loads; ``scripts/convert_trusted_checkpoint.py`` rewrites one
  from a source you trust that holds other objects (numpy values, OmegaConf nodes).
* **Only our classes, of sane sizes.** The run config stored in a checkpoint is instantiated
  with Hydra (the loss; evaluate.py also the data), so its targets are checked section by
  section, as are its hyper_parameters and inference settings, and its weights are compared
  with the model they describe before any is allocated
  (:mod:`lightning_modules.checkpoint_contents`).
* **No zip bombs.** ``torch.save`` stores its entries uncompressed; an archive with
  compressed entries could expand far beyond its size and is refused.
* **Only our files.** The checkpoint's callback state names checkpoint files that Lightning
  may later delete; entries outside the checkpoint's own folder are dropped on resume
  (:func:`lightning_modules.callback_state.confine_callback_state`).
"""

from __future__ import annotations

import glob
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from biasseg.errors import InputError
from lightning_modules.checkpoint_contents import (
    inference_settings_problem,
    instantiate_section,
    module_arguments,
    state_dict_problem,
    window_problem,
)
from lightning_modules.predictor import Predictor
from lightning_modules.segmentation_module import SegmentationModule

CONVERT_HINT = "if you trust its source, convert it once: python scripts/convert_trusted_checkpoint.py IN OUT"


@dataclass
class TrainedModel:
    """A trained module and how its data was preprocessed (``inference_settings``, see
    ``SegmentationDataModule.inference_settings``)."""

    module: SegmentationModule
    inference_settings: dict
    predictor: Predictor  # how it predicts: the module alone (load_trained), or the checkpoints together (load_ensemble)


def load_untrusted(path: str | Path, what: str = "ckpt_path", mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` with one-line errors naming ``what`` and the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{what}={path}: no such file")
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive with an index at its end
        raise InputError(f"{what}={path}: not a readable PyTorch checkpoint (not torch.save's zip format: truncated, damaged or another file)")
    try:
        with zipfile.ZipFile(path) as archive:
            compressed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        raise InputError(f"{what}={path}: not a readable PyTorch checkpoint ({error})") from None
    if compressed:
        raise InputError(f"{what}={path}: refused: compressed entries ({compressed[0]}), which torch.save never writes, could expand without bound")
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


def read_checkpoint(ckpt_path: str | Path, mmap: bool = False) -> dict:
    """A checkpoint written by train.py, read safely (``mmap``: tensors stay on disk until
    used); clear errors for anything else."""
    checkpoint = load_untrusted(ckpt_path, mmap=mmap)
    kinds = {"run_config": dict, "state_dict": dict, "hyper_parameters": dict}
    wrong = [k for k, kind in kinds.items() if not isinstance(checkpoint.get(k), kind)]
    if wrong:
        raise InputError(f"ckpt_path={ckpt_path}: not a checkpoint written by train.py (no {', '.join(wrong)})")
    return checkpoint


def load_trained(checkpoint: dict, sliding_window: dict | None = None, source: str = "checkpoint") -> TrainedModel:
    """The module with the checkpoint's weights (eval mode, on the CPU).

    ``sliding_window`` (``SlidingWindow`` keyword arguments) replaces the validation
    settings the model was trained with; None keeps them. ``source`` names the checkpoint in
    error messages. Everything is checked before it is built (see
    :mod:`lightning_modules.checkpoint_contents`).
    """
    hparams = module_arguments(checkpoint.get("hyper_parameters", {}), source)
    if sliding_window is not None:
        stored = hparams.get("sliding_window")
        hparams["sliding_window"] = {**(stored if isinstance(stored, dict) else {}), **sliding_window}
        problem = window_problem(hparams["sliding_window"], list(hparams.get("features", [8])))
        if problem:
            raise InputError(f"{source}: {problem}")
    loss = instantiate_section(checkpoint["run_config"].get("loss"), "loss", source)

    def build() -> SegmentationModule:
        return SegmentationModule(loss=loss, **hparams)

    try:
        problem = state_dict_problem(build, checkpoint["state_dict"])
        if problem:
            raise InputError(f"{source}: its weights do not fit the model its hyper_parameters describe ({problem})")
        module = build()
        module.load_state_dict(checkpoint["state_dict"])
    except InputError as error:
        raise InputError(f"{source}: {error}" if source not in str(error) else str(error)) from None
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"{source}: its hyper_parameters are unusable ({type(error).__name__}: {str(error)[:200]})") from None
    module.eval()
    settings = checkpoint.get("inference_settings") or {}
    problem = inference_settings_problem(settings, int(hparams["in_channels"]))
    if problem:
        raise InputError(f"{source}: its inference_settings are unusable: {problem}")
    return TrainedModel(module, settings, Predictor([module]))


def checkpoint_paths(ckpt_path: str | Sequence[str]) -> list[Path]:
    """The files ``ckpt_path`` names: one path, a glob pattern (``…/seed*/checkpoints/last.ckpt``,
    sorted) or a list of either; one-line errors for a pattern that matches nothing."""
    entries = [ckpt_path] if isinstance(ckpt_path, (str, Path)) else list(ckpt_path)
    paths: list[Path] = []
    for entry in entries:
        entry = str(Path(str(entry)).expanduser())
        if glob.has_magic(entry):
            matched = sorted(glob.glob(entry))
            if not matched:
                raise InputError(f"ckpt_path={entry}: the pattern matches no file")
            paths += [Path(m) for m in matched]
        else:
            paths.append(Path(entry))
    if not paths:
        raise InputError("ckpt_path: no checkpoint given")
    duplicates = sorted({str(p) for p in paths if paths.count(p) > 1})
    if duplicates:
        raise InputError(f"ckpt_path={duplicates[0]}: given twice; an ensemble's members must be different checkpoints")
    return paths


def read_checkpoints(ckpt_path: str | Sequence[str]) -> list[tuple[Path, dict]]:
    """Every checkpoint ``ckpt_path`` names (:func:`checkpoint_paths`), read safely."""
    return [(path, read_checkpoint(path)) for path in checkpoint_paths(ckpt_path)]


def load_ensemble(checkpoints: Sequence[tuple[Path, dict]], sliding_window: dict | None = None,
                  alpha: float | None = None) -> TrainedModel:
    """The first checkpoint's module, with a :class:`~lightning_modules.predictor.Predictor`
    that averages every checkpoint's probability maps. Members must share the
    classes, input channels and preprocessing (``inference_settings``), each named in the
    error if not. ``alpha`` fixes a Tversky hypernetwork's α (every member must be one)."""
    if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha={alpha}: a Tversky hypernetwork's α lies in [0, 1]")
    models, first_path = [], checkpoints[0][0]
    for path, checkpoint in checkpoints:
        source = f"ckpt_path={path}"
        trained = load_trained(checkpoint, sliding_window=sliding_window, source=source)
        if alpha is not None:
            if trained.module.hypernet is None:
                raise InputError(f"{source}: alpha={alpha} is given, but this model is not a Tversky hypernetwork (model=tversky_hypernet)")
        if models:
            first, module = models[0], trained.module
            if (module.hparams.num_classes, module.class_names) != (first.module.hparams.num_classes, first.module.class_names):
                raise InputError(f"{source}: its classes {module.class_names} differ from those of {first_path} "
                                 f"({first.module.class_names}); an ensemble's members segment the same classes")
            if module.hparams.in_channels != first.module.hparams.in_channels or trained.inference_settings != first.inference_settings:
                raise InputError(f"{source}: its input channels or preprocessing (inference_settings) differ from those of {first_path}; "
                                 "an ensemble's members must read images the same way")
        models.append(trained)
    models[0].predictor = Predictor([m.module for m in models], None if alpha is None else float(alpha))
    return models[0]
