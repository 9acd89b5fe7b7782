"""A trained model's volume calibration on disk, bound to the weights it was fitted for.

``train.py`` writes ``checkpoints/volume_calibration.json`` beside ``last.ckpt`` at the end
of a run (:class:`biasseg.callbacks.volume_calibration.VolumeCalibrationWriter`): the recalibration
maps and interval scales of :mod:`biasseg.metrics.volume_quote`, the calibration subjects' names and
``model_sha256``, a digest of the network's weights. ``evaluate.py`` and ``predict.py`` read it
and refuse one fitted for other weights: a calibration belongs to one model.

The file is plain JSON, read as untrusted input: nothing in it runs, every entry is checked
(names, lengths, finite numbers, probabilities in [0, 1] and non-decreasing for the isotonic
map) and a problem is one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from biasseg.errors import InputError
from biasseg.metrics.posthoc import LOG_ODDS_BINS
from biasseg.metrics.volume_quote import METHODS, TARGETS, CalibrationMaps, VolumeCalibration

FORMAT = "biasseg-volume-calibration"
VERSION = 1
FILE_NAME = "volume_calibration.json"
MAX_BYTES = 16 * 1024 * 1024  # a calibration of 100 classes is ~3 MB


class CalibrationOfAnotherModel(InputError):
    """The calibration file was fitted for other weights."""


def weights_digest(network: nn.Module) -> str:
    """SHA-256 of a network's parameters and buffers (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def calibration_record(calibration: VolumeCalibration, network: nn.Module, class_names: list[str],
                       subjects: list[str], verdict: str) -> dict:
    """The JSON-ready record of ``calibration`` for ``network``."""
    maps = calibration.maps
    record = {
        "format": FORMAT,
        "version": VERSION,
        "model_sha256": weights_digest(network),
        "class_names": list(class_names),
        "method": calibration.method,
        "target": calibration.target,
        "alpha": calibration.alpha,
        "interval_kind": calibration.interval_kind,
        "calibration_subjects": list(subjects),
        "verdict": verdict,
        "temperature": maps.temperature.tolist(),
        "platt_slope": maps.platt_slope.tolist(),
        "platt_bias": maps.platt_bias.tolist(),
        "isotonic": maps.isotonic.tolist(),
        # json cannot hold inf: an unbounded interval is null
        "interval_scale": {m: [v if math.isfinite(v) else None for v in calibration.scale[m].tolist()] for m in METHODS},
    }
    if calibration.uncertainty is not None:  # NaN (fewer than 2 subjects) is null
        record["recalibration_uncertainty"] = [v if math.isfinite(v) else None for v in calibration.uncertainty.tolist()]
    return record


def _numbers(path: Path, record: dict, key: str, length: int, finite: bool = True) -> list[float]:
    values = record.get(key)
    if not isinstance(values, list) or len(values) != length or not all(
            (v is None and not finite) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            for v in values):
        raise InputError(f"{path}: {key} must be {length} finite number(s)")
    return [math.inf if v is None else float(v) for v in values]


def read_calibration(path: str | Path, network: nn.Module, class_names: list[str]) -> tuple[VolumeCalibration, dict]:
    """The calibration stored at ``path`` for ``network`` (``class_names`` its classes), and the
    record; one-line :class:`InputError` naming the file for anything else, a calibration
    fitted for other weights included."""
    path = Path(path).expanduser()
    try:
        if path.stat().st_size > MAX_BYTES:
            raise InputError(f"{path}: {path.stat().st_size} bytes, too large for a volume calibration")
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such calibration file") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{path}: not a readable calibration file ({type(error).__name__})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{path}: not a biasseg volume calibration (format {FORMAT!r} expected)")
    if record.get("version") != VERSION:
        raise InputError(f"{path}: calibration version {record.get('version')!r}, this biasseg reads {VERSION}")
    if record.get("model_sha256") != weights_digest(network):
        raise CalibrationOfAnotherModel(f"{path}: fitted for another model (its weights differ from the checkpoint's); "
                         "use the calibration written with that checkpoint, or calibration=none")
    if record.get("class_names") != list(class_names):
        raise InputError(f"{path}: classes {record.get('class_names')!r}, the model's are {list(class_names)}")
    classes = len(class_names)
    method, alpha = record.get("method"), record.get("alpha")
    if method not in METHODS:
        raise InputError(f"{path}: method {method!r} is not one of {METHODS}")
    if not isinstance(alpha, float) or not 0 < alpha < 1:
        raise InputError(f"{path}: alpha must be a number in (0, 1), got {alpha!r}")
    temperature = _numbers(path, record, "temperature", classes)
    if min(temperature) <= 0:
        raise InputError(f"{path}: temperature must be > 0")
    isotonic = record.get("isotonic")
    if not isinstance(isotonic, list) or len(isotonic) != classes:
        raise InputError(f"{path}: isotonic must hold {classes} map(s) of {LOG_ODDS_BINS} probabilities")
    rows = [_numbers(path, {"isotonic": row}, "isotonic", LOG_ODDS_BINS) for row in isotonic]
    if any(v < 0 or v > 1 for row in rows for v in row) or any(a > b for row in rows for a, b in zip(row, row[1:])):
        raise InputError(f"{path}: isotonic maps must be non-decreasing probabilities in [0, 1]")
    scales = record.get("interval_scale")
    if not isinstance(scales, dict) or set(scales) != set(METHODS):
        raise InputError(f"{path}: interval_scale must give one scale per class for each of {METHODS}")
    scale = {m: torch.tensor(_numbers(path, {m: scales[m]}, m, classes, finite=False), dtype=torch.float64) for m in METHODS}
    if any(bool((s < 0).any()) for s in scale.values()):
        raise InputError(f"{path}: interval scales must be >= 0")
    subjects = record.get("calibration_subjects")
    if not isinstance(subjects, list) or not all(isinstance(s, str) for s in subjects):
        raise InputError(f"{path}: calibration_subjects must be a list of case names")
    maps = CalibrationMaps(
        torch.tensor(temperature, dtype=torch.float64),
        torch.tensor(_numbers(path, record, "platt_slope", classes), dtype=torch.float64),
        torch.tensor(_numbers(path, record, "platt_bias", classes), dtype=torch.float64),
        torch.tensor(rows, dtype=torch.float64),
    )
    target = record.get("target", "reference")  # optional: calibrations written before it was stored are the label's
    if target not in TARGETS:
        raise InputError(f"{path}: target {target!r} is not one of {TARGETS}")
    kind = record.get("interval_kind")
    uncertainty = None  # optional: calibrations written before it was stored lack it
    if "recalibration_uncertainty" in record:
        values = _numbers(path, record, "recalibration_uncertainty", classes, finite=False)
        if any(v < 0 for v in values):
            raise InputError(f"{path}: recalibration_uncertainty must be >= 0")
        uncertainty = torch.tensor([math.nan if math.isinf(v) else v for v in values], dtype=torch.float64)
    return VolumeCalibration(maps, scale, alpha, kind if isinstance(kind, str) else "?", len(subjects), method,
                             uncertainty, target), record


CHOICES = ("auto", *METHODS)


def resolve_calibration(choice: str, file: str | None, checkpoints: list[Path], network: nn.Module, class_names: list[str]
                        ) -> tuple[VolumeCalibration | None, str, str]:
    """The stored calibration that ``evaluate.py``/``predict.py`` apply, the method, and a note.

    ``choice``: ``auto`` (the method stored with the calibration), or the recalibration to
    apply, ``none`` included (the uncalibrated soft volume with the interval fitted for it).
    ``file``: the calibration file; None = ``volume_calibration.json`` in the checkpoint's
    folder. A calibration that is missing or fitted for other weights is an error where it was
    asked for (a file, or a method other than ``auto``/``none``); otherwise the soft volume is
    quoted uncalibrated, without interval, and the note says why. Several checkpoints (an
    ensemble, fold models) average into another model, which no stored calibration was
    fitted for.
    """
    if choice not in CHOICES:
        raise InputError(f"calibration must be one of {CHOICES}, got {choice!r}")
    required = choice not in ("auto", "none") or bool(file)
    if len(checkpoints) > 1:
        if required:
            raise InputError(f"calibration={choice}: a calibration belongs to one model; {len(checkpoints)} checkpoints "
                             "average into another. Use one checkpoint, or calibration=none")
        return None, "none", "several checkpoints: no stored calibration applies (each was fitted for one model)"
    path = Path(file).expanduser() if file else checkpoints[0].parent / FILE_NAME
    if not path.exists() and not required:
        return None, "none", f"no {FILE_NAME} beside the checkpoint: the uncalibrated soft volume, without interval"
    try:
        calibration, _ = read_calibration(path, network, class_names)
    except CalibrationOfAnotherModel:
        if required:
            raise
        # e.g. best-….ckpt: the file beside it belongs to the run's last validated weights (last.ckpt)
        return None, "none", f"{path} was fitted for another checkpoint of this run: not applied (uncalibrated soft volume)"
    if choice != "auto":
        calibration.method = choice
    aim = " to the raters' mean volume" if calibration.target == "raters_mean" else ""
    return calibration, calibration.method, f"{calibration.method} recalibration{aim} and {100 * (1 - calibration.alpha):.0f} % " \
                                            f"interval from {path} ({calibration.subjects} calibration subjects)"
