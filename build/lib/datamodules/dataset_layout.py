"""Dataset folders described by a ``dataset.json``: Medical Segmentation Decathlon or nnU-Net v2.

Decathlon (MSD)::

    dataset.json  {"modality": {"0": "FLAIR", …}, "labels": {"0": "background", "1": "edema", …},
                   "training": [{"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz"}, …]}
    imagesTr/X.nii.gz     one file per case, channels along the 4th axis
    labelsTr/X.nii.gz

nnU-Net v2 raw::

    dataset.json  {"channel_names": {"0": "T2", …}, "labels": {"background": 0, "PZ": 1, …},
                   "file_ending": ".nii.gz"}
    imagesTr/X_0000.nii.gz, X_0001.nii.gz, …   one file per channel
    labelsTr/X.nii.gz                          cases are the files in labelsTr

Label values must be the consecutive integers ``0 … C − 1`` (0 = background).

Images and labels are NIfTI files (``.nii.gz``, ``.nii``): other formats (``.mha``, ``.nrrd``,
whose headers may name data files elsewhere) are refused; convert them first, e.g. with
SimpleITK. A dataset folder may come from anyone, so ``dataset.json`` is checked like the
images: its fields must have the documented types, every file it names must lie inside the folder
(``..``, absolute paths and symbolic links out of it are refused unless
``allow_outside_root``), case names are the file names without their image ending (so
``sub.1.nii.gz`` is case ``sub.1``) and must be unique, and the dataset's name only reaches
the cache path as a safe file name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from datamodules.image_files import NIFTI_ENDINGS
from input_errors import DatasetError

LAYOUTS = ("msd", "nnunet")
MAX_NAME_LENGTH = 200  # characters of a case name (cache files add theirs; file systems stop at 255 bytes)


@dataclass(frozen=True)
class CaseFiles:
    """One case: its name, image file(s) (one per channel, or one 4D file) and label file."""

    name: str
    images: tuple[Path, ...]
    label: Path

    @property
    def files(self) -> tuple[Path, ...]:
        return (*self.images, self.label)


@dataclass(frozen=True)
class DatasetLayout:
    """What ``dataset.json`` says: the cases and the names of channels and classes."""

    root: Path
    layout: str
    name: str
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]  # including background, index = label value
    cases: tuple[CaseFiles, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def channels_in_one_file(self) -> bool:
        """MSD stores all channels in one 4D file; nnU-Net one file per channel."""
        return self.layout == "msd"

    @property
    def safe_name(self) -> str:
        """The dataset's name as a harmless file name (for the cache path): letters, digits,
        ``._-`` only, no leading dot, at most 64 characters."""
        cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).lstrip(".")[:64]
        return cleaned or "dataset"


def case_name(path: Path) -> str:
    """``path``'s file name without its NIfTI ending (``sub.1.nii.gz`` → ``sub.1``)."""
    name = path.name
    ending = next((e for e in NIFTI_ENDINGS if name.endswith(e)), "")
    return name[: len(name) - len(ending)] if ending else name


def _indexed(mapping: object, what: str, json_path: Path) -> tuple[str, ...]:
    """``{"0": a, "1": b}`` → ``(a, b)``, requiring the keys 0 … n − 1."""
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetError([f"{json_path}: '{what}' must be a non-empty mapping, got {_short(mapping)}"])
    try:
        items = sorted((int(k), str(v)) for k, v in mapping.items())
    except (TypeError, ValueError):
        raise DatasetError([f"{json_path}: '{what}' keys must be integers, got {_short(list(mapping))}"]) from None
    if [k for k, _ in items] != list(range(len(items))):
        raise DatasetError([f"{json_path}: '{what}' must be numbered 0 … {len(items) - 1}, got {_short([k for k, _ in items])}"])
    return tuple(v for _, v in items)


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile file must not flood the message)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _class_names_nnunet(labels: object, json_path: Path) -> tuple[str, ...]:
    """nnU-Net's ``{"background": 0, "PZ": 1}`` → ``("background", "PZ")``."""
    if not isinstance(labels, dict) or not labels:
        raise DatasetError([f"{json_path}: 'labels' must be a non-empty mapping, got {_short(labels)}"])
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise DatasetError([f"{json_path}: region-based labels (lists of values) are not supported: {_short(labels)}"])
    if any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        raise DatasetError([f"{json_path}: 'labels' values must be integers, got {_short(labels)}"])
    if len(set(labels.values())) != len(labels):
        raise DatasetError([f"{json_path}: 'labels' gives one value to several names: {_short(labels)}"])
    return _indexed({v: k for k, v in labels.items()}, "labels", json_path)


class _Confinement:
    """Resolves the paths ``dataset.json`` names and collects those outside the dataset folder."""

    def __init__(self, root: Path, json_path: Path, allow_outside_root: bool) -> None:
        self.root, self.json_path, self.allow = root, json_path, allow_outside_root
        self.problems: list[str] = []

    def __call__(self, path: Path, given: str | None = None) -> Path:
        """``path`` made absolute (``..`` resolved, symbolic links followed), noting an escape
        and a file that is not NIfTI."""
        if not path.name.endswith(NIFTI_ENDINGS):
            self.problems.append(f"{self.json_path}: {given or path}: only NIfTI files (.nii.gz, .nii) are read; convert it first")
        try:
            resolved = (self.root / path).resolve()
        except (RuntimeError, OSError) as error:  # a symbolic link loop
            self.problems.append(f"{self.json_path}: {given or self.root / path}: cannot be resolved ({error})")
            return self.root / path
        if not self.allow and not resolved.is_relative_to(self.root):
            named = f"{given!r} names" if given is not None else f"{self.root / path} is"
            self.problems.append(
                f"{self.json_path}: {named} {resolved}, outside the dataset folder "
                "(set data.allow_outside_root=true if that is intended)"
            )
        return resolved

    def raise_problems(self) -> None:
        if self.problems:
            raise DatasetError(self.problems)


def read_layout(root: str | Path, allow_outside_root: bool = False) -> DatasetLayout:
    """Read ``root/dataset.json`` (either layout) and list the training cases.

    Raises :class:`DatasetError` naming the file when the description itself is unusable
    (wrong types, files outside ``root`` unless ``allow_outside_root``, repeated case names);
    the files it lists are checked later by :func:`datamodules.input_checks.check_cases`.
    """
    root = Path(root).expanduser().resolve()
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise DatasetError([f"{json_path}: missing (data.root must hold a Decathlon or nnU-Net dataset.json)"])
    try:
        description = json.loads(json_path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise DatasetError([f"{json_path}: cannot be read as JSON: {str(error)[:200] or type(error).__name__}"]) from None
    if not isinstance(description, dict):
        raise DatasetError([f"{json_path}: must hold a JSON object, got {type(description).__name__}"])
    confine = _Confinement(root, json_path, allow_outside_root)
    if "channel_names" in description and "file_ending" in description:
        layout = _nnunet_layout(root, json_path, description, confine)
    elif "training" in description and "modality" in description:
        layout = _msd_layout(root, json_path, description, confine)
    else:
        raise DatasetError([
            f"{json_path}: neither a Decathlon dataset.json (needs 'modality' and 'training') "
            "nor an nnU-Net v2 one (needs 'channel_names' and 'file_ending')"
        ])
    confine.raise_problems()
    if not layout.cases:
        raise DatasetError([f"{json_path}: lists no training cases"])
    return layout


def _unique_names(cases: list[CaseFiles], json_path: Path) -> None:
    """Refuse two cases with one name (they would share results and cache entries), and names
    too long for the cache's file names."""
    first: dict[str, CaseFiles] = {}
    problems = []
    for case in cases:
        if len(case.name) > MAX_NAME_LENGTH:
            problems.append(f"{case.label}: case name longer than {MAX_NAME_LENGTH} characters")
        elif case.name in first:
            problems.append(f"{json_path}: case name {case.name!r} is used by both {first[case.name].label} and {case.label}")
        else:
            first[case.name] = case
    if problems:
        raise DatasetError(problems)


def _msd_layout(root: Path, json_path: Path, description: dict, confine: _Confinement) -> DatasetLayout:
    training = description["training"]
    if not isinstance(training, list):
        raise DatasetError([f"{json_path}: 'training' must be a list of {{'image': …, 'label': …}}, got {_short(training)}"])
    cases, problems = [], []
    for index, entry in enumerate(training):
        fields = entry if isinstance(entry, dict) else {}
        missing = [k for k in ("image", "label") if not isinstance(fields.get(k), str) or not fields.get(k)]
        if missing:
            problems.append(f"{json_path}: training entry {index} needs {' and '.join(repr(k) for k in missing)} (file paths), got {_short(entry)}")
            continue
        image, label = confine(Path(fields["image"]), fields["image"]), confine(Path(fields["label"]), fields["label"])
        name = case_name(Path(fields["label"]))
        if not name or name in (".", ".."):
            problems.append(f"{json_path}: training entry {index}: {fields['label']!r} gives no case name")
            continue
        cases.append(CaseFiles(name, (image,), label))
    if problems:
        raise DatasetError(problems)
    _unique_names(cases, json_path)
    return DatasetLayout(
        root=root,
        layout="msd",
        name=str(description.get("name", root.name)),
        channel_names=_indexed(description["modality"], "modality", json_path),
        class_names=_indexed(description.get("labels"), "labels", json_path),
        cases=tuple(cases),
    )


def _nnunet_layout(root: Path, json_path: Path, description: dict, confine: _Confinement) -> DatasetLayout:
    ending = description["file_ending"]
    if ending not in NIFTI_ENDINGS:
        raise DatasetError([f"{json_path}: 'file_ending' must be one of {list(NIFTI_ENDINGS)} (NIfTI is read), got {_short(ending)}"])
    channels = _indexed(description["channel_names"], "channel_names", json_path)
    class_names = _class_names_nnunet(description.get("labels"), json_path)
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise DatasetError([f"{labels_dir}: missing (nnU-Net datasets keep their labels in labelsTr/)"])
    cases = []
    # hidden files (macOS "._case.nii.gz" resource forks, editors' temporaries) are not cases
    for label in sorted(p for p in labels_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith(".")):
        name = label.name[: -len(ending)]
        images = tuple(confine(Path("imagesTr") / f"{name}_{c:04d}{ending}") for c in range(len(channels)))
        cases.append(CaseFiles(name, images, confine(label.relative_to(root))))
    _unique_names(cases, json_path)
    expected = description.get("numTraining")
    if expected is not None and expected != len(cases):
        raise DatasetError([f"{json_path}: numTraining is {_short(expected)} but {labels_dir} holds {len(cases)} *{ending} files"])
    return DatasetLayout(
        root=root,
        layout="nnunet",
        name=root.name,
        channel_names=channels,
        class_names=class_names,
        cases=tuple(cases),
    )
