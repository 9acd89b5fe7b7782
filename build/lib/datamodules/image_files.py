"""Reading one image file someone gave us, without trusting its header.

Two rules make a file safe to check and preprocess:

* **Its header does not decide how much memory we use.** A NIfTI header declares the data's
  shape and type; a truncated or crafted file can declare gigabytes it does not hold. The
  declared size is compared with what the file holds (the file size, or for ``.nii.gz`` a
  bounded, streamed decompression that keeps nothing) and with this machine's memory before
  any voxel array is allocated.
* **One geometry.** Preprocessing reads images through TorchIO, i.e. ITK, which takes the
  sform only when it is a rotation and scaling and otherwise the qform; nibabel always prefers
  the sform. A file whose qform and sform disagree (or whose sform ITK ignores) would
  therefore be checked in one geometry and trained in another, so it is refused; otherwise
  the affine is the one ITK reads, for the checks and the preprocessing alike.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torchio as tio

AFFINE_TOLERANCE = 1e-3  # mm (and direction cosines): the agreement nnU-Net also asks for
NIFTI_ENDINGS = (".nii.gz", ".nii")
MEMORY_SHARE = 0.5  # refuse an image whose float32 copy would need more than this share of the machine's memory
_CHUNK = 1 << 24


class UnreadableImage(Exception):
    """The file cannot be used; the message says why (without the path, the caller adds it)."""


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_ENDINGS)


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _human(size: float) -> str:
    """``12.3 MB`` style (powers of 1024)."""
    unit = 0
    while size >= 1024 and unit < 4:
        size, unit = size / 1024, unit + 1
    return f"{size:.1f} {('B', 'KB', 'MB', 'GB', 'TB')[unit]}"


def _reason(error: BaseException, path: Path) -> str:
    """``Type: message`` on one line, the file's own path (already named by the caller) elided."""
    text = " ".join(str(error).split()).replace(f'"{path}"', "it").replace(str(path), "it")
    return f"{type(error).__name__}: {text[:200]}"


def _stored_bytes(path: Path, needed: int) -> int:
    """Bytes the file holds after decompression, counted up to ``needed`` (nothing kept)."""
    if not path.name.endswith(".gz"):
        return path.stat().st_size
    count = 0
    try:
        with gzip.open(path, "rb") as stream:
            while count < needed:
                chunk = stream.read(min(_CHUNK, needed - count))
                if not chunk:
                    break
                count += len(chunk)
    except EOFError:  # the gzip stream itself ends early: truncated
        pass
    except (OSError, zlib.error) as error:
        raise UnreadableImage(f"cannot be read: damaged gzip data ({_reason(error, path)})") from None
    return count


def nifti_header(path: Path) -> nib.Nifti1Header:
    """The header, after checking that the file holds the data it declares and that the
    data fit in memory."""
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for broken headers
        raise UnreadableImage(f"cannot be read as NIfTI ({_reason(error, path)})") from None
    header = image.header
    shape = tuple(int(s) for s in header.get_data_shape())
    dtype = header.get_data_dtype()
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise UnreadableImage(f"data type {dtype} is not a real number type")
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise UnreadableImage(f"header declares the shape {shape}; a 3D volume (4D: channels last) is needed")
    with nib.openers.ImageOpener(path) as stored:  # the fields as written (nibabel's loaded header resets the scaling)
        problem = scaling_problem(type(header).from_fileobj(stored))
    if problem:
        raise UnreadableImage(problem)
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    memory = physical_memory_bytes()
    as_float32 = int(np.prod(shape, dtype=object)) * 4
    if memory is not None and as_float32 > MEMORY_SHARE * memory:
        raise UnreadableImage(
            f"header declares {shape} voxels ({_human(as_float32)} as float32), "
            f"more than {MEMORY_SHARE:.0%} of this machine's {_human(memory)} memory"
        )
    offset = int(getattr(image.dataobj, "offset", header.get_data_offset()))  # where nibabel will read from
    stored = _stored_bytes(path, offset + declared)
    if stored < offset + declared:
        raise UnreadableImage(
            f"cannot be read: truncated, the header declares {shape} {dtype} voxels ({_human(declared)} from byte {offset}), "
            f"the file holds {_human(max(stored - offset, 0))} of them"
        )
    return header


def scaling_problem(header: nib.Nifti1Header) -> str | None:
    """Why the header's intensity scaling is ambiguous, or None. NIfTI scales stored values by
    ``scl_slope`` and ``scl_inter`` unless the slope is 0; ITK and nibabel agree when both
    fields are "unset" (0 or NaN) or both are ordinary numbers, not otherwise (e.g. a slope of 0
    with an intercept: ITK adds the intercept, nibabel does not — a label map would shift by it)."""
    if "scl_slope" not in header:
        return None
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    unset = (slope == 0 or math.isnan(slope)) and (inter == 0 or math.isnan(inter))
    ordinary = math.isfinite(slope) and abs(slope) >= 1e-30 and math.isfinite(inter)
    if unset or ordinary:
        return None
    return f"its intensity scaling (scl_slope={slope:g}, scl_inter={inter:g}) is read differently by ITK and nibabel"


def resampled_size_problem(shape: tuple[int, ...], affine: np.ndarray, target_spacing, arrays: int) -> str | None:
    """Why resampling an image of ``shape`` (C, W, H, D) on ``affine`` to ``target_spacing``
    (mm) would not fit in memory, counting ``arrays`` float32 copies per channel, or None. A
    file whose header claims a spacing far from the others' is small on disk and huge after."""
    if target_spacing is None:
        return None
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    voxels = float(np.prod(np.asarray(shape[-3:]) * spacing / np.asarray(target_spacing, dtype=float)))
    need = voxels * 4 * max(int(shape[0]), 1) * arrays
    memory = physical_memory_bytes()
    if not math.isfinite(need) or (memory is not None and need > MEMORY_SHARE * memory):
        return (
            f"its spacing {np.round(spacing, 3).tolist()} mm, resampled to {list(target_spacing)} mm, gives {voxels:.3g} voxels, "
            f"more than {MEMORY_SHARE:.0%} of this machine's memory"
        )
    return None


def itk_affine(path: Path) -> np.ndarray:
    """The RAS+ affine the preprocessing will use (TorchIO's ITK reader, header only)."""
    try:
        return tio.io.get_ras_affine_from_sitk(tio.io.get_reader(path))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise UnreadableImage(f"cannot be read by ITK, which preprocesses it ({first[:200]})") from None


def geometry_problem(header: nib.Nifti1Header, affine: np.ndarray) -> str | None:
    """Why a NIfTI header's geometry is ambiguous between ITK (``affine``) and nibabel, or None."""
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qform is not None and sform is not None and not np.allclose(qform, sform, atol=AFFINE_TOLERANCE):
        itk_uses = "sform" if np.allclose(affine, sform, atol=AFFINE_TOLERANCE) else "qform"
        return (
            f"its qform and sform disagree by up to {np.abs(qform - sform).max():.4g} mm, so tools place it differently "
            f"(ITK, which preprocesses it, uses the {itk_uses}; nibabel the sform; others the qform); "
            "make them agree, e.g. with nibabel: img.set_qform(img.get_sform())"
        )
    if sform is not None and not np.allclose(affine, sform, atol=AFFINE_TOLERANCE):
        return "its sform is not a rotation and scaling (ITK ignores it, nibabel uses it); store a rigid sform or only a qform"
    return None


def read_image(path: Path, with_data: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """``(data (C, W, H, D) as stored or None, affine)`` of one NIfTI file; raises
    :class:`UnreadableImage`. The declared size is checked first, voxel values come through
    nibabel (TorchIO's ITK reader turns NaN into 0, hiding them), the geometry as ITK reads
    it (see the module docstring)."""
    if not is_nifti(path):
        raise UnreadableImage("only NIfTI files (.nii.gz, .nii) are read; convert it first")
    header = nifti_header(path)
    affine = itk_affine(path)
    problem = geometry_problem(header, affine)
    if problem:
        raise UnreadableImage(problem)
    if not with_data:
        return None, affine
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except Exception as error:
        raise UnreadableImage(f"cannot be read ({_reason(error, path)})") from None
    data = data.reshape(data.shape[:3] + (-1,))  # 3D → one channel; 4D channels last
    return np.moveaxis(data, -1, 0), affine
