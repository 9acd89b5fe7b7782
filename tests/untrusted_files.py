"""Crafted and broken files for the untrusted-input tests: pickled payloads, checkpoints with
foreign targets, NIfTI headers that lie, dataset folders that point elsewhere."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from helpers import ROOT


class Payload:
    """Unpickling this runs ``open(marker, "w")``: it creates ``marker`` (the proof of execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_checkpoint(source: Path, target: Path, marker: Path) -> Path:
    """``source`` checkpoint with a payload added: loading it with full unpickling creates ``marker``."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["extra"] = Payload(marker)
    torch.save(checkpoint, target)
    return target


def modified_checkpoint(source: Path, target: Path, change) -> Path:
    """``source`` with ``change(checkpoint_dict)`` applied, saved as plain data."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, target)
    return target


def tree_digest(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """sha1 of every file under ``root`` (except under ``skip``), to prove nothing changed."""
    digest = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(path.is_relative_to(s) for s in skip):
            digest[str(path.relative_to(root))] = hashlib.sha1(path.read_bytes()).hexdigest()
    return digest


def nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None, **header_fields) -> Path:
    """Write ``data`` as NIfTI with ``affine`` (qform and sform) and any header fields set."""
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.5, 1.0]) if affine is None else affine)
    for key, value in header_fields.items():
        image.header[key] = value
    nib.save(image, path)
    return path


def lying_header(path: Path, shape=(2000, 2000, 1000), keep_bytes: int = 4096) -> Path:
    """A small valid NIfTI whose header declares ``shape`` float32 voxels it does not hold."""
    small = nifti(path, np.zeros((8, 8, 8), np.float32))
    image = nib.load(small)
    header = image.header.copy()
    header.set_data_shape(shape)
    raw = header.binaryblock + b"\0" * 4 + b"\0" * keep_bytes
    if path.name.endswith(".gz"):
        import gzip

        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def run_entry_point(script: str, *args: str, cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python <script> args`` from the project, with its output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The ``error: …`` line of a run that failed cleanly (status 1, no traceback)."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines, result.stderr[-3000:]
    return lines[0]
