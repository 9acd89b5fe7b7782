"""Finding training run directories and reading what they wrote.

A run directory is any folder holding ``.hydra/config.yaml``. From it we read only the keys
a report needs (task name, seed, data, model and loss sections, ``trainer.max_epochs``), resolving
each value on its own: interpolations that need Hydra (``${hydra:…}``, ``${now:…}``) cannot be
resolved afterwards and become ``None`` instead of failing the whole file.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from biasseg.renamed_targets import current_targets

REQUIRED_SUBJECT_COLUMNS = ("subject", "dice", "volume_ref_ml", "volume_pred_ml", "volume_pred_soft_ml")


@dataclass
class Run:
    """One run directory and its results. ``problem`` says why it cannot be reported (its
    files are missing or unreadable); ``complete`` whether its last validation is the last
    epoch. ``subjects`` maps each subjects.csv column to ``{subject: value}`` (volumes ml)."""

    path: Path
    task_name: str = "?"
    loss_name: str = "?"
    choices: dict[str, str] = field(default_factory=dict)
    added_keys: list[str] = field(default_factory=list)  # config keys the command line added (+key=…, ++key=…)
    seed: int | None = None
    max_epochs: int | None = None
    data: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    subjects: dict[str, dict[str, float]] = field(default_factory=dict)
    calibration: list[dict[str, float | str]] | None = None
    lesion_config: dict = field(default_factory=dict)  # the config's lesions section
    lesions: list[dict[str, str]] = field(default_factory=list)  # lesions.csv rows, as read
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # val key -> [(step, value)], from csv/metrics.csv
    problem: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def epoch(self) -> int | None:
        """The epoch (0-based) of the last validation, from metrics.json."""
        value = self.metrics.get("epoch")
        return int(value) if isinstance(value, (int, float)) else None

    @property
    def complete(self) -> bool:
        """True when the last validation is the last epoch (or the run has no epoch limit)."""
        if self.problem is not None or self.epoch is None:
            return False
        return self.max_epochs is None or self.max_epochs < 0 or self.epoch >= self.max_epochs - 1

    @property
    def exclusion(self) -> str | None:
        """Why the run is left out of the table, or None."""
        if self.problem is not None:
            return self.problem
        if not self.complete:
            return f"incomplete: last validation after epoch {self.epoch + 1} of {self.max_epochs}"
        return None

    def class_names(self) -> list[str]:
        """Foreground class names with their own subjects.csv columns (``dice/<name>``);
        empty with one foreground class."""
        return [column.split("/", 1)[1] for column in self.subjects if column.startswith("dice/")]


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Every run directory under ``roots`` (themselves included), sorted, without duplicates."""
    found = set()
    for root in roots:
        if (root / ".hydra" / "config.yaml").is_file():
            found.add(root.resolve())
        found.update(p.parent.parent.resolve() for p in root.rglob(".hydra/config.yaml"))
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list:
    """Sort job folders 0, 1, …, 10 numerically."""
    return [int(part) if part.isdigit() else part for part in path.parts]


def plain(node) -> object:
    """A config node as plain Python, each value resolved on its own (None when it cannot be)."""
    if isinstance(node, DictConfig):
        return {str(key): plain(_resolved(node, key)) for key in node}
    if isinstance(node, ListConfig):
        return [plain(_resolved(node, index)) for index in range(len(node))]
    return node


def _resolved(node, key):
    try:
        return node[key]
    except Exception:  # an interpolation that only Hydra can resolve
        return None


def read_run(path: Path) -> Run:
    """Read a run directory; problems are recorded on the run, never raised."""
    run = Run(path=path)
    try:
        config = OmegaConf.load(path / ".hydra" / "config.yaml")
    except Exception as error:
        run.problem = f"unreadable .hydra/config.yaml ({error})"
        return run
    run.task_name = str(plain(_resolved(config, "task_name")) or "?")
    seed = plain(_resolved(config, "seed"))
    run.seed = int(seed) if isinstance(seed, (int, float)) else None
    trainer = plain(_resolved(config, "trainer")) or {}
    max_epochs = trainer.get("max_epochs") if isinstance(trainer, dict) else None
    run.max_epochs = int(max_epochs) if isinstance(max_epochs, (int, float)) else None
    run.data = current_targets(plain(_resolved(config, "data")) or {})
    model = plain(_resolved(config, "model"))
    run.model = current_targets(model) if isinstance(model, dict) else {}
    run.loss = current_targets(plain(_resolved(config, "loss")) or {})
    lesions = plain(_resolved(config, "lesions"))
    run.lesion_config = lesions if isinstance(lesions, dict) else {}
    run.choices, run.added_keys = _choices(path), _added_keys(path)
    target = str(run.loss.get("_target_", "")) if isinstance(run.loss, dict) else ""
    run.loss_name = run.choices.get("loss") or target.rsplit(".", 1)[-1] or "?"
    if run.choices.get("model") == "tversky_hypernet":  # one network for all α: a method of its own
        run.loss_name = f"{run.loss_name}_hypernet"
    if not run.loss:
        run.problem = "no loss section in .hydra/config.yaml (not a training run)"
        return run
    run.problem = _read_results(run)
    return run


def _choices(path: Path) -> dict[str, str]:
    """``hydra.runtime.choices`` (option per config group), empty when unknown."""
    try:
        hydra = OmegaConf.load(path / ".hydra" / "hydra.yaml")
        choices = plain(hydra.hydra.runtime.choices)
    except Exception:
        return {}
    return {str(k): str(v) for k, v in choices.items() if v is not None} if isinstance(choices, dict) else {}


def _added_keys(path: Path) -> list[str]:
    """The keys that the run's command line added to the config (``+data.foo=1``, ``++model.x=2``)."""
    try:
        overrides = OmegaConf.load(path / ".hydra" / "overrides.yaml")
    except Exception:
        return []
    if not isinstance(overrides, ListConfig):
        return []
    return [str(o).lstrip("+").split("=", 1)[0] for o in overrides if isinstance(o, str) and o.startswith("+")]


def _read_results(run: Run) -> str | None:
    """Fill metrics, subjects and calibration; the problem that leaves the run out, if any."""
    metrics_path, subjects_path = run.path / "metrics.json", run.path / "subjects.csv"
    if not metrics_path.is_file():
        return "no metrics.json (no validation epoch finished)"
    try:
        run.metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as error:
        return f"unreadable metrics.json ({error})"
    if not isinstance(run.metrics, dict) or run.epoch is None:
        run.metrics = {}
        return "metrics.json has no epoch"
    if not subjects_path.is_file():
        return "no subjects.csv"
    try:
        run.subjects = read_columns(subjects_path)
    except (OSError, ValueError, csv.Error) as error:
        return f"unreadable subjects.csv ({error})"
    missing = [c for c in REQUIRED_SUBJECT_COLUMNS[1:] if c not in run.subjects]
    if missing:
        return f"subjects.csv lacks {', '.join(missing)}"
    if not run.subjects["dice"]:
        return "subjects.csv has no rows"
    run.history = read_history(run.path / "csv" / "metrics.csv")
    calibration_path = run.path / "calibration.csv"
    if calibration_path.is_file():
        try:
            run.calibration = read_calibration(calibration_path)
        except (OSError, ValueError, KeyError, csv.Error) as error:
            run.warnings.append(f"unreadable calibration.csv, left out of the reliability diagram ({error})")
    lesions_path = run.path / "lesions.csv"
    if lesions_path.is_file():
        try:
            run.lesions = read_lesions(lesions_path)
        except (OSError, ValueError, csv.Error) as error:
            run.warnings.append(f"unreadable lesions.csv, left out of the lesion tables ({error})")
    return None


def to_float(text: str | None) -> float:
    """A CSV cell as float; empty or unparsable cells are NaN."""
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_columns(path: Path) -> dict[str, dict[str, float]]:
    """subjects.csv as ``{column: {subject: value}}`` (every column but ``subject``)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "subject" not in reader.fieldnames:
            raise ValueError("no 'subject' column")
        columns: dict[str, dict[str, float]] = {name: {} for name in reader.fieldnames if name != "subject"}
        for row in reader:
            for name, values in columns.items():
                values[row["subject"]] = to_float(row.get(name))
    return columns


HISTORY_KEYS = ("val/relative_soft_expected_volume_bias", "val/relative_expected_volume_bias",
                "val/soft_relative_volume_bias", "val/relative_volume_bias", "val/dice")


def read_history(path: Path) -> dict[str, list[tuple[int, float]]]:
    """The validation values of :data:`HISTORY_KEYS` at every logged step (``logger=csv``);
    empty without the file or when it cannot be read."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error):
        return {}
    history: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step = to_float(row.get("step"))
        for key in HISTORY_KEYS:
            value = to_float(row.get(key))
            if not math.isnan(value) and not math.isnan(step):
                history.setdefault(key, []).append((int(step), value))
    return history


LESION_REPORT_COLUMNS = ("kind", "detected", "size_bin_ml", "volume_pred_soft_ml", "volume_expected_ml")


def read_lesions(path: Path) -> list[dict[str, str]]:
    """lesions.csv rows as read (strings), checked to have :data:`LESION_REPORT_COLUMNS`."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in LESION_REPORT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        return list(reader)


def read_calibration(path: Path) -> list[dict[str, float | str]]:
    """calibration.csv rows: ``class`` (str) and ``lower, upper, count, mean_probability,
    frequency`` (float)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    numeric = ("lower", "upper", "count", "mean_probability", "frequency")
    return [{"class": row["class"], **{key: to_float(row[key]) for key in numeric}} for row in rows]
