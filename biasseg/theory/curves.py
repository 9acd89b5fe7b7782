"""Implied volume bias of each loss against the uncertainty σ, for one sphere."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from biasseg.theory.expected_loss import LossSpec, implied_volumes, named_loss
from biasseg.theory.groups import sphere_groups
from biasseg.theory.prediction import run_loss_spec
from datamodules import SyntheticDataModule

ROW_KEYS = ("kind", "radius_mm", "sigma_mm", "loss", "expected_ml", "soft_ml", "hard_ml",
            "relative_soft", "relative_hard")
RUN_SIGMAS_MM = tuple(0.25 * i for i in range(13))  # σ (0–3 mm) of a run's curve, besides the run's own


def bias_curve(
    kind: str,
    sigmas_mm: Sequence[float],
    radius_mm: float,
    spacing_mm: Sequence[float],
    losses: Sequence[str] | Mapping[str, LossSpec],
    batch_size: int = 2,
    field_of_view_mm: float | Sequence[float] = 64.0,
    num_draws: int = 256,
    bins: int = 400,
    seed: int = 0,
) -> list[dict[str, object]]:
    """One row per σ and loss (keys :data:`ROW_KEYS`) for a sphere of ``radius_mm`` in an image
    of ``field_of_view_mm`` (a cube's side, or three sides) on a grid of ``spacing_mm``, with
    ``kind`` uncertainty.

    ``losses`` are ``configs/loss`` names (:data:`biasseg.theory.expected_loss.LOSS_NAMES`, with
    ``batch_size`` what ``softdice_batch`` pools over), or names mapped to :class:`LossSpec`.
    Volumes in ml: the expected ``Σ q``, and the optimum's soft ``Σ p`` and hard
    ``Σ [p > 0.5]``; ``relative_*`` are ``(volume − expected) / expected``. Every σ draws its
    labels from ``seed`` afresh (common random numbers: smooth curves, the same rows whichever
    σ are asked together); the losses share the draws.
    """
    specs = dict(losses) if isinstance(losses, Mapping) else {name: named_loss(name, batch_size) for name in losses}
    rows = []
    for sigma in sigmas_mm:
        rng = np.random.default_rng(seed)
        groups = sphere_groups(radius_mm, sigma, kind, spacing_mm, field_of_view_mm, num_draws, rng, bins)
        for name, spec in specs.items():
            volumes = implied_volumes(groups, spec)
            rows.append({
                "kind": kind, "radius_mm": float(radius_mm), "sigma_mm": float(sigma), "loss": name,
                "expected_ml": volumes.expected_ml, "soft_ml": volumes.soft_ml, "hard_ml": volumes.hard_ml,
                "relative_soft": volumes.relative_soft, "relative_hard": volumes.relative_hard,
            })
    return rows


def run_bias_curve(run_config: DictConfig | Mapping) -> dict[str, list[float]] | None:
    """``{"sigma", "relative_soft", "relative_hard"}``: the :func:`bias_curve` of a synthetic
    run's loss for a sphere of the data's mean radius, its kind and spacing, in an image of
    the training patch, at :data:`RUN_SIGMAS_MM` and the run's own σ (mm); ``None`` for other
    data, more than one foreground class, soft targets or losses not modelled."""
    config = run_config if isinstance(run_config, DictConfig) else OmegaConf.create(dict(run_config))
    data = config.data
    if not issubclass(get_class(data._target_), SyntheticDataModule) or data.get("label_mode", "hard") == "soft":
        return None
    datamodule = instantiate(data)
    spec = run_loss_spec(config)
    if spec is None or datamodule.num_classes != 2:
        return None
    case = datamodule.case_kwargs
    sigmas = sorted({*RUN_SIGMAS_MM, float(case["sigma_mm"])})
    field_of_view = [p * s for p, s in zip(datamodule.patch_size, case["spacing_mm"])]
    rows = bias_curve(case["kind"], sigmas, float(np.mean(case["radius_mm"])), case["spacing_mm"], {"run": spec},
                      field_of_view_mm=field_of_view)
    return {"sigma": sigmas, **{key: [r[key] for r in rows] for key in ("relative_soft", "relative_hard")}}
