"""The theory per lesion: each lesion's volume at the optimum of a run's expected loss.

A soft Dice per image couples an image's lesions through the image's sums (its optimum is
nearly a threshold on ``q``, set by the whole image), so the optimum is found once per image,
on the case's voxel groups (:func:`biasseg.theory.expected_loss.optimal_probabilities`), and
mapped back to the voxels (:func:`optimal_map`). The lesions are then found, matched and
measured by :func:`biasseg.metrics.lesions.lesion_rows` as a trained model's map is: the
optimum's hard map ``p > 0.5`` as the prediction, the case's label draw as the reference and
``q`` as the expected map. So a lesion's predicted and measured volumes cover the same region
of the same validation case, and the prediction inherits :mod:`biasseg.theory.prediction`'s
simplifications (whole images; a batch Dice pools draws of the same image). Binary: one
foreground class; volumes in ml, radii in mm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from scipy.special import expit, logit, ndtri

from biasseg.metrics.lesions import lesion_rows, lesion_settings
from biasseg.theory.expected_loss import EPSILON, LossSpec, optimal_probabilities
from biasseg.theory.groups import CERTAIN_Z, case_groups, nearest_surface
from biasseg.theory.prediction import BINS, NUM_DRAWS, SEED, run_loss_spec
from datamodules import SyntheticDataModule
from datamodules.synthetic_volumes import SyntheticCase, structure_distances


def optimal_map(case: SyntheticCase, loss: LossSpec, rng: np.random.Generator) -> np.ndarray:
    """``p`` ``(W, H, D)`` float64: the foreground probability at the optimum of the expected
    ``loss`` on ``case``. A voxel gets its group's optimum, interpolated in ``q`` within its
    part (``voxel`` uncertainty: one curve ``p(q)`` for the whole image; ``boundary``: one per
    structure, the voxel's nearest surface's), as a shift of its log-odds; certain voxels keep
    ``q``."""
    groups = case_groups(case, NUM_DRAWS, rng, BINS)
    optimum = optimal_probabilities(groups, loss)
    if case.kind == "voxel":
        q = case.probabilities[1].astype(np.float64).ravel()
        part = np.zeros(q.size, dtype=np.int64)
        z = ndtri(np.clip(q, 0.0, 1.0))
    else:
        distances = structure_distances(case.label.shape, case.spacing_mm, case.structures)
        part, _, z, q = nearest_surface(distances, np.array([s.radius_mm for s in case.structures]), case.sigma_mm)
    p = q.copy()
    uncertain = np.abs(z) <= CERTAIN_Z
    offset = logit(np.clip(optimum, EPSILON, 1 - EPSILON)) - logit(np.clip(groups.probability, EPSILON, 1 - EPSILON))
    for index in np.unique(groups.part[groups.free]):
        mine = groups.free & (groups.part == index)
        order = np.argsort(groups.probability[mine], kind="stable")
        voxels = uncertain & (part == index)
        # the log-odds shift is what is interpolated: exact where the optimum is p = q (cross-entropy),
        # and no bin's mean q leaks onto the voxels beyond the outermost bins' means
        shift = np.interp(q[voxels], groups.probability[mine][order], offset[mine][order])
        p[voxels] = expit(logit(np.clip(q[voxels], EPSILON, 1 - EPSILON)) + shift)
    return p.reshape(case.label.shape)


def predicted_lesion_rows(run_config: DictConfig | Mapping) -> list[np.ndarray] | None:
    """Per validation case of a synthetic run, the :func:`biasseg.metrics.lesions.lesion_rows`
    (columns :data:`~biasseg.metrics.lesions.LESION_COLUMNS`) of its loss's optimum, with the
    run's lesion settings; ``None`` where the loss or data are not modelled (as
    :func:`biasseg.theory.predicted_volume_bias`) or the run measured no lesions."""
    config = run_config if isinstance(run_config, DictConfig) else OmegaConf.create(dict(run_config))
    settings = lesion_settings(config.get("lesions"), float(config.model.get("soft_volume_margin_mm", 10.0)))
    spec = run_loss_spec(config)
    if settings is None or spec is None or not issubclass(get_class(config.data._target_), SyntheticDataModule):
        return None
    datamodule = instantiate(config.data)
    if datamodule.num_classes != 2 or datamodule.label_mode == "soft":
        return None
    rows = []
    for i in range(datamodule.num_train, datamodule.num_train + datamodule.num_val):
        case = datamodule.generate(i)
        p = optimal_map(case, spec, np.random.default_rng([SEED, i]))
        rows.append(lesion_rows(p > 0.5, case.label == 1, p, case.spacing_mm, settings, expected=case.probabilities[1]))
    return rows


def equivalent_radius_mm(volume_ml: np.ndarray) -> np.ndarray:
    """The radius (mm) of a sphere of ``volume_ml``: ``(3 V / 4π)^⅓`` with V in mm³."""
    return np.cbrt(3.0 * np.asarray(volume_ml, dtype=np.float64) * 1000.0 / (4.0 * math.pi))

