"""Bounded fuzzing of everything a dataset folder or a prediction folder can hold.

Each case takes a valid tiny dataset (or folder of scans), breaks it one seeded random way —
truncation, a random header field set to a hostile value, qform and sform swapped, bytes
flipped inside the compressed stream, a mutated dataset.json — and runs the real loader
(check, preprocess, cache) or predict.py. Every case must end either in an
:class:`InputError` whose lines name a file or key, or in a correct run; never another
exception (a traceback for the user), and never a changed file outside the run's own output
(the cache, the prediction folder).
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import TINY, compose_config
from omegaconf import OmegaConf
from untrusted_files import nifti, tree_digest

from biasseg.errors import InputError
from biasseg.generated_folders import write_msd, write_nnunet
from biasseg.pipelines.predict import predict
from biasseg.pipelines.train import train
from datamodules import FolderDataModule

DATASET_CASES = 120
PREDICT_CASES = 40
HOSTILE_NUMBERS = [0, -1, 1, 2, 3, 5, 7, 8, 255, 256, 32767, -32768, 1e-30, 1e30, math.inf, -math.inf, math.nan, 0.5, 352, 351, 1e9]


def header_view(raw: bytes) -> np.ndarray:
    return np.frombuffer(bytearray(raw[:348]), dtype=nib.nifti1.header_dtype)


def read_raw(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def write_raw(path: Path, raw: bytes) -> None:
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


def set_header_field(path: Path, rng: np.random.Generator) -> str:
    raw = read_raw(path)
    header = header_view(raw).copy()
    field = str(rng.choice(["dim", "datatype", "bitpix", "vox_offset", "pixdim", "qform_code", "sform_code", "srow_x",
                            "srow_y", "srow_z", "quatern_b", "quatern_d", "qoffset_x", "scl_slope", "scl_inter", "sizeof_hdr",
                            "magic", "dim_info", "intent_code"]))
    if field == "magic":
        header[field] = rng.choice([b"ni1\0", b"xyz\0", b"n+2\0"])
    else:
        shape = header[field].shape[1:]
        value = float(rng.choice(HOSTILE_NUMBERS))
        current = header[field][0].copy()
        if shape:
            index = int(rng.integers(shape[0]))
            current[index] = np.asarray(value).astype(current.dtype) if np.isfinite(value) or current.dtype.kind == "f" else 0
        else:
            current = np.asarray(value).astype(current.dtype) if np.isfinite(value) or current.dtype.kind == "f" else 0
        header[field] = current
    write_raw(path, header.tobytes() + raw[348:])
    return f"header {field}"


def truncate(path: Path, rng: np.random.Generator) -> str:
    data = path.read_bytes()
    cut = int(rng.integers(0, len(data)))
    path.write_bytes(data[:cut])
    return f"truncated at {cut}"


def flip_bytes(path: Path, rng: np.random.Generator) -> str:
    data = bytearray(path.read_bytes())
    for _ in range(int(rng.integers(1, 8))):
        position = int(rng.integers(len(data) // 4, len(data)))
        data[position] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))
    return "bytes flipped"


def swap_forms(path: Path, rng: np.random.Generator) -> str:
    image = nib.load(path, mmap=False)  # the file is rewritten below: no memory map onto it
    flipped = image.affine.copy()
    flipped[:3, int(rng.integers(3))] *= -1
    out = nib.Nifti1Image(np.array(image.dataobj), image.affine)
    out.set_sform(image.affine, code=int(rng.integers(1, 5)))
    out.set_qform(flipped, code=int(rng.integers(1, 5)))
    nib.save(out, path)
    return "qform and sform differ"


def mutate_json(root: Path, rng: np.random.Generator) -> str:
    description = json.loads((root / "dataset.json").read_text())
    choice = int(rng.integers(9))
    if choice == 0:
        key = str(rng.choice(sorted(description)))
        del description[key]
        what = f"dropped {key}"
    elif choice == 1:
        key = str(rng.choice(sorted(description)))
        description[key] = [None, 3, "text", [], {}, [1, 2]][int(rng.integers(6))]
        what = f"{key} retyped"
    elif choice == 2 and "training" in description:
        description["training"].append({"image": "../../outside.nii.gz", "label": "/etc/passwd"})
        what = "entries outside"
    elif choice == 3 and "training" in description:
        description["training"].append(dict(description["training"][0]))
        what = "duplicate entry"
    elif choice == 4:
        description["numTraining"] = int(rng.integers(-2, 50))
        what = "numTraining"
    elif choice == 5:
        (root / "dataset.json").write_bytes(rng.bytes(int(rng.integers(0, 64))))
        return "garbage json"
    elif choice == 6:
        description["labels"] = {"0": "background", "2": "x"} if "training" in description else {"background": 0, "x": 3}
        what = "labels not consecutive"
    elif choice == 7:
        description["name"] = "../" * int(rng.integers(1, 6)) + "escaped"
        what = "name escapes"
    else:
        description.setdefault("training", []).insert(0, {"image": 5, "label": None})
        what = "entry of wrong types"
    (root / "dataset.json").write_text(json.dumps(description))
    return what


FILE_MUTATIONS = [set_header_field, set_header_field, truncate, flip_bytes, swap_forms]


def assert_clear(error: InputError) -> None:
    """Every line of the message names a file (a path) or a config key."""
    lines = [line.strip(" -") for line in str(error).splitlines()]
    body = lines[1:] if len(lines) > 1 else lines
    assert body and all("/" in line or "data." in line for line in body), str(error)


@pytest.mark.parametrize("seed", range(DATASET_CASES))
def test_a_randomly_broken_dataset_is_refused_clearly_or_loads_correctly(tmp_path, seed):
    rng = np.random.default_rng(seed)
    writer = (write_msd, write_nnunet)[seed % 2]
    root = writer(tmp_path / "data", num_cases=3)
    if rng.random() < 0.25:
        what = mutate_json(root, rng)
    else:
        files = sorted(p for p in root.rglob("*.nii.gz"))
        target = files[int(rng.integers(len(files)))]
        what = f"{target.name}: {FILE_MUTATIONS[int(rng.integers(len(FILE_MUTATIONS)))](target, rng)}"
    before = tree_digest(tmp_path)
    cache = tmp_path / "cache"
    try:
        dm = FolderDataModule(root=str(root), cache_dir=str(cache), num_workers=0, patch_size=(16, 16, 8))
        dm.setup()
    except InputError as error:
        assert_clear(error)
    else:  # a correct run: every case cached, arrays of the documented types and shapes
        for case in [*dm.train_cases, *dm.val_cases]:
            image, label = case.arrays()
            assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape[1:] == label.shape, what
            assert np.isfinite(image).all() and label.max() < dm.num_classes, what
    assert tree_digest(tmp_path, skip=(cache,)) == before, what
    assert sorted(p.name for p in tmp_path.iterdir()) in (["data"], ["cache", "data"]), what


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fuzz_trained") / "run"
    train(compose_config([*TINY, "callbacks.validation_figures=null"], run))
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("seed", range(PREDICT_CASES))
def test_predict_on_randomly_broken_scans_is_refused_clearly_or_correct(checkpoint, tmp_path, seed):
    rng = np.random.default_rng(1000 + seed)
    scans = tmp_path / "in"
    scans.mkdir()
    for name, ending in (("a", ".nii.gz"), ("b", ".nii")):
        nifti(scans / f"{name}{ending}", rng.normal(size=(20, 24, 12)).astype(np.float32), np.diag([1.0, 0.9, 1.6, 1.0]))
    target = sorted(scans.iterdir())[int(rng.integers(2))]
    FILE_MUTATIONS[int(rng.integers(len(FILE_MUTATIONS)))](target, rng)
    before = tree_digest(tmp_path)
    output = tmp_path / "out"
    config = OmegaConf.create({"ckpt_path": str(checkpoint), "input": str(scans), "output": str(output), "save_probabilities": True,
                               "device": "cpu", "overlap": None, "batch_size": None, "overwrite": False})
    try:
        predict(config)
    except InputError as error:
        assert_clear(error)
        assert not output.exists()  # every input is checked before anything is written
    else:
        for scan in scans.iterdir():
            name = scan.name.split(".")[0]
            assert nib.load(output / f"{name}.nii.gz").shape == nib.load(scan).shape[:3]
    assert tree_digest(tmp_path, skip=(output,)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) in (["in"], ["in", "out"])
