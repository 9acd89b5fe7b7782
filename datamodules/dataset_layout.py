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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from datamodules.input_checks import DatasetError

LAYOUTS = ("msd", "nnunet")


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


def _indexed(mapping: dict, what: str, json_path: Path) -> tuple[str, ...]:
    """``{"0": a, "1": b}`` → ``(a, b)``, requiring the keys 0 … n − 1."""
    try:
        items = sorted((int(k), str(v)) for k, v in mapping.items())
    except (TypeError, ValueError):
        raise DatasetError([f"{json_path}: {what} keys must be integers, got {list(mapping)}"]) from None
    if [k for k, _ in items] != list(range(len(items))):
        raise DatasetError([f"{json_path}: {what} must be numbered 0 … {len(items) - 1}, got {[k for k, _ in items]}"])
    return tuple(v for _, v in items)


def _class_names_nnunet(labels: dict, json_path: Path) -> tuple[str, ...]:
    """nnU-Net's ``{"background": 0, "PZ": 1}`` → ``("background", "PZ")``."""
    if any(not isinstance(v, int) for v in labels.values()):
        raise DatasetError([f"{json_path}: region-based labels (lists of values) are not supported: {labels}"])
    return _indexed({v: k for k, v in labels.items()}, "label values", json_path)


def read_layout(root: str | Path) -> DatasetLayout:
    """Read ``root/dataset.json`` (either layout) and list the training cases.

    Raises :class:`DatasetError` naming the file when the description itself is unusable;
    the files it lists are checked later by :func:`datamodules.input_checks.check_cases`.
    """
    root = Path(root).expanduser().resolve()
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise DatasetError([f"{json_path}: missing (data.root must hold a Decathlon or nnU-Net dataset.json)"])
    try:
        description = json.loads(json_path.read_text())
    except (OSError, ValueError) as error:
        raise DatasetError([f"{json_path}: cannot be read as JSON: {error}"]) from None
    if "channel_names" in description and "file_ending" in description:
        return _nnunet_layout(root, json_path, description)
    if "training" in description and "modality" in description:
        return _msd_layout(root, json_path, description)
    raise DatasetError([
        f"{json_path}: neither a Decathlon dataset.json (needs 'modality' and 'training') "
        "nor an nnU-Net v2 one (needs 'channel_names' and 'file_ending')"
    ])


def _msd_layout(root: Path, json_path: Path, description: dict) -> DatasetLayout:
    cases = []
    for entry in description["training"]:
        image, label = root / entry["image"], root / entry["label"]
        cases.append(CaseFiles(Path(entry["label"]).name.split(".")[0], (image,), label))
    return DatasetLayout(
        root=root,
        layout="msd",
        name=str(description.get("name", root.name)),
        channel_names=_indexed(description["modality"], "modality", json_path),
        class_names=_indexed(description["labels"], "labels", json_path),
        cases=tuple(cases),
    )


def _nnunet_layout(root: Path, json_path: Path, description: dict) -> DatasetLayout:
    ending = description["file_ending"]
    channels = _indexed(description["channel_names"], "channel_names", json_path)
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise DatasetError([f"{labels_dir}: missing (nnU-Net datasets keep their labels in labelsTr/)"])
    cases = []
    for label in sorted(labels_dir.glob(f"*{ending}")):
        name = label.name[: -len(ending)]
        images = tuple(root / "imagesTr" / f"{name}_{c:04d}{ending}" for c in range(len(channels)))
        cases.append(CaseFiles(name, images, label))
    expected = description.get("numTraining")
    if expected is not None and expected != len(cases):
        raise DatasetError([f"{json_path}: numTraining is {expected} but {labels_dir} holds {len(cases)} *{ending} files"])
    return DatasetLayout(
        root=root,
        layout="nnunet",
        name=root.name,
        channel_names=channels,
        class_names=_class_names_nnunet(description["labels"], json_path),
        cases=tuple(cases),
    )
