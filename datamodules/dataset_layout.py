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

Several raters per case (each case annotated by the same raters, numbered 1 … R):

* nnU-Net, rater suffixes: ``labelsTr/X_rater1.nii.gz``, ``X_rater2.nii.gz``, … (every label
  file of ``labelsTr`` then carries one);
* nnU-Net, one folder per rater: ``labelsTr_rater1/X.nii.gz``, ``labelsTr_rater2/X.nii.gz``, …
  (and no ``labelsTr/``);
* Decathlon: ``"label": ["./labelsTr/X_r1.nii.gz", "./labelsTr/X_r2.nii.gz", …]``, a list in
  rater order; the case is named after its image.

A case missing a rater, a rater numbering with gaps and a mix of single and several labels
are refused, naming the case and the rater.

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

from biasseg.errors import DatasetError
from datamodules.image_files import NIFTI_ENDINGS

LAYOUTS = ("msd", "nnunet")
MAX_NAME_LENGTH = 200  # characters of a case name (cache files add theirs; file systems stop at 255 bytes)


@dataclass(frozen=True)
class CaseFiles:
    """One case: its name, image file(s) (one per channel, or one 4D file) and label file; with
    several raters their label files in rater order (``label`` is then the first of them)."""

    name: str
    images: tuple[Path, ...]
    label: Path
    raters: tuple[Path, ...] = ()

    @property
    def labels(self) -> tuple[Path, ...]:
        """Every label file: the raters', or the one label."""
        return self.raters or (self.label,)

    @property
    def files(self) -> tuple[Path, ...]:
        return (*self.images, *self.labels)


@dataclass(frozen=True)
class DatasetLayout:
    """What ``dataset.json`` says: the cases and the names of channels and classes."""

    root: Path
    layout: str
    name: str
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]  # including background; index = label value, or with regions 1 + region index
    cases: tuple[CaseFiles, ...]
    regions: tuple[tuple[int, ...], ...] | None = None  # nnU-Net region labels: the label values each region covers
    regions_class_order: tuple[int, ...] | None = None  # the label value each region writes, in order, when exported

    @property
    def num_classes(self) -> int:
        """Classes including background (with regions: 1 + the number of regions)."""
        return len(self.class_names)

    @property
    def label_values(self) -> tuple[int, ...]:
        """The integer values a label file may hold."""
        if self.regions is None:
            return tuple(range(self.num_classes))
        return tuple(sorted({0, *(v for region in self.regions for v in region), *self.regions_class_order}))

    @property
    def num_raters(self) -> int:
        """Label files per case where several raters annotated each; 0 = one label."""
        return len(self.cases[0].raters) if self.cases else 0

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


def _regions_nnunet(labels: dict, order: object, json_path: Path) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """nnU-Net's region labels, ``{"background": 0, "whole tumour": [1, 2, 3], "core": [2, 3],
    "enhancing": 3}`` with ``"regions_class_order": [1, 2, 3]`` → (names with background first,
    each region's label values, the order). Each region is its own sigmoid output (nnU-Net's
    region-based training); exporting writes ``regions_class_order[i]`` where region ``i`` is
    predicted, later regions over earlier ones."""
    names, regions = ["background"], []
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
            raise DatasetError([f"{json_path}: region {name!r} must be label values from 0 to 255 (an int or a list), got {_short(value)}"])
        if values == [0]:
            if name != names[0] and len(names) > 1:
                raise DatasetError([f"{json_path}: the background (value 0) must be listed first, as {name!r} is not"])
            names[0] = str(name)
            continue
        if 0 in values:
            raise DatasetError([f"{json_path}: region {name!r} includes the background value 0"])
        names.append(str(name))
        regions.append(tuple(sorted(set(values))))
    if not regions:
        raise DatasetError([f"{json_path}: region labels need at least one region besides the background"])
    if len(set(regions)) != len(regions):
        raise DatasetError([f"{json_path}: two regions cover the same label values: {_short(labels)}"])
    if not (isinstance(order, list) and len(order) == len(regions) and all(isinstance(v, int) and not isinstance(v, bool)
                                                                           and 0 < v <= 255 for v in order)):
        raise DatasetError([f"{json_path}: region labels need 'regions_class_order', one positive label value per region "
                            f"({len(regions)}), got {_short(order)}"])
    return tuple(names), tuple(regions), tuple(order)


def _class_names_nnunet(labels: object, json_path: Path) -> tuple[str, ...]:
    """nnU-Net's ``{"background": 0, "PZ": 1}`` → ``("background", "PZ")``."""
    if not isinstance(labels, dict) or not labels:
        raise DatasetError([f"{json_path}: 'labels' must be a non-empty mapping, got {_short(labels)}"])
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
    description = _read_description(json_path)
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


def _read_description(json_path: Path) -> dict:
    """The JSON object of a ``dataset.json``; a :class:`DatasetError` naming it otherwise."""
    try:
        description = json.loads(json_path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise DatasetError([f"{json_path}: cannot be read as JSON: {str(error)[:200] or type(error).__name__}"]) from None
    if not isinstance(description, dict):
        raise DatasetError([f"{json_path}: must hold a JSON object, got {type(description).__name__}"])
    return description


@dataclass(frozen=True)
class LabelScheme:
    """What a ``dataset.json``'s ``labels`` declare (see :class:`DatasetLayout`'s fields of the same names)."""

    class_names: tuple[str, ...]
    regions: tuple[tuple[int, ...], ...] | None = None
    regions_class_order: tuple[int, ...] | None = None


def _nnunet_labels(description: dict, json_path: Path) -> LabelScheme:
    """nnU-Net's ``labels``: exclusive classes, or regions where any value is a list."""
    labels = description.get("labels")
    if isinstance(labels, dict) and labels and any(isinstance(v, list) for v in labels.values()):
        return LabelScheme(*_regions_nnunet(labels, description.get("regions_class_order"), json_path))
    return LabelScheme(_class_names_nnunet(labels, json_path))


def read_label_scheme(json_path: Path) -> LabelScheme:
    """The classes or regions a ``dataset.json`` of either layout declares, read as strictly as
    :func:`read_layout` reads them (only ``labels`` and ``regions_class_order`` are needed: a
    test set's description may list no cases)."""
    description = _read_description(json_path)
    labels = description.get("labels")
    if isinstance(labels, dict) and labels and all(isinstance(v, str) for v in labels.values()):  # Decathlon
        return LabelScheme(_indexed(labels, "labels", json_path))
    return _nnunet_labels(description, json_path)


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
        label = fields.get("label")
        several = isinstance(label, list)
        missing = [] if isinstance(fields.get("image"), str) and fields["image"] else ["'image'"]
        if not (len(label) >= 2 and all(isinstance(p, str) and p for p in label) if several else isinstance(label, str) and label):
            missing.append("'label'")
        if missing:
            problems.append(f"{json_path}: training entry {index} needs {' and '.join(missing)} "
                            f"(file paths; 'label' may list 2 or more raters' files), got {_short(entry)}")
            continue
        image = confine(Path(fields["image"]), fields["image"])
        named_by = fields["image"] if several else fields["label"]
        name = case_name(Path(named_by))
        if not name or name in (".", ".."):
            problems.append(f"{json_path}: training entry {index}: {named_by!r} gives no case name")
            continue
        if several:
            raters = tuple(confine(Path(p), p) for p in fields["label"])
            cases.append(CaseFiles(name, (image,), raters[0], raters))
        else:
            cases.append(CaseFiles(name, (image,), confine(Path(fields["label"]), fields["label"])))
    counts = sorted({len(c.raters) for c in cases})
    if len(counts) > 1:
        odd = next(c for c in cases if len(c.raters) != len(cases[0].raters))
        problems.append(f"{json_path}: case {odd.name!r} has {len(odd.raters) or 1} label file(s), case {cases[0].name!r} "
                        f"{len(cases[0].raters) or 1}: every case needs the same raters")
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
    scheme = _nnunet_labels(description, json_path)
    labels_dir = root / "labelsTr"
    rater_dirs = {int(m.group(1)): p for p in sorted(root.glob("labelsTr_rater*")) if p.is_dir()
                  and (m := re.fullmatch(r"labelsTr_rater(\d+)", p.name))}
    if labels_dir.is_dir() and rater_dirs:
        raise DatasetError([f"{root}: holds both labelsTr/ and labelsTr_rater*/ folders; keep one layout"])
    if not labels_dir.is_dir() and not rater_dirs:
        raise DatasetError([f"{labels_dir}: missing (nnU-Net datasets keep their labels in labelsTr/, or one labelsTr_rater<k>/ per rater)"])
    raters = _nnunet_raters(labels_dir, rater_dirs, ending)
    cases = []
    for name, by_rater in raters.items():
        images = tuple(confine(Path("imagesTr") / f"{name}_{c:04d}{ending}") for c in range(len(channels)))
        labels = tuple(confine(by_rater[k].relative_to(root)) for k in sorted(by_rater))
        cases.append(CaseFiles(name, images, labels[0], labels if len(labels) > 1 else ()))
    _unique_names(cases, json_path)
    expected = description.get("numTraining")
    if expected is not None and expected != len(cases):
        raise DatasetError([f"{json_path}: numTraining is {_short(expected)} but the labels name {len(cases)} cases (*{ending} files)"])
    return DatasetLayout(
        root=root,
        layout="nnunet",
        name=root.name,
        channel_names=channels,
        class_names=scheme.class_names,
        cases=tuple(cases),
        regions=scheme.regions,
        regions_class_order=scheme.regions_class_order,
    )


def _label_files(folder: Path, ending: str) -> list[Path]:
    """The label files of ``folder`` (hidden files, e.g. macOS "._case.nii.gz" forks, are not cases)."""
    return sorted(p for p in folder.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))


def _nnunet_raters(labels_dir: Path, rater_dirs: dict[int, Path], ending: str) -> dict[str, dict[int, Path]]:
    """``{case: {rater: label file}}`` of an nnU-Net folder: one label per case (under rater 1
    of a plain ``labelsTr/``; see :func:`read_layout` for the layouts with several), every
    case with every rater 1 … R."""
    found: dict[str, dict[int, Path]] = {}
    if rater_dirs:
        for rater, folder in rater_dirs.items():
            for path in _label_files(folder, ending):
                found.setdefault(path.name[: -len(ending)], {})[rater] = path
        where = {k: f"{folder}/{{case}}{ending}" for k, folder in rater_dirs.items()}
    else:
        files = _label_files(labels_dir, ending)
        suffixed = {p: re.fullmatch(r"(.+)_rater(\d+)", p.name[: -len(ending)]) for p in files}
        plain = [p for p, match in suffixed.items() if match is None]
        if plain and len(plain) < len(files):
            raise DatasetError([f"{labels_dir}: mixes label files with a rater suffix (_rater<k>{ending}) and without "
                                f"(e.g. {plain[0].name}); use one convention"])
        for path, match in suffixed.items():
            name, rater = (path.name[: -len(ending)], 1) if match is None else (match.group(1), int(match.group(2)))
            found.setdefault(name, {})[rater] = path
        where = {k: f"{labels_dir}/{{case}}_rater{k}{ending}" for k in {r for v in found.values() for r in v}}
    raters = sorted({r for by_rater in found.values() for r in by_rater})
    if raters and raters != list(range(1, len(raters) + 1)):
        raise DatasetError([f"{labels_dir if not rater_dirs else labels_dir.parent}: raters are numbered {raters}; number them 1 … {len(raters)}"])
    problems = [f"{name}: no label of rater {k} ({where[k].format(case=name)} is missing)"
                for name, by_rater in found.items() for k in raters if k not in by_rater]
    if problems:
        raise DatasetError(problems)
    return found
