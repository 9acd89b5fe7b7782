"""The volume bias a training run's loss implies on the run's own validation cases.

Models the run's loss at its expected-loss optimum (:mod:`biasseg.theory.expected_loss`) on each
validation case of the run's data, under that case's known label uncertainty. Simplifications,
said where they matter: the loss is taken over whole images (exact when the training patch is
the volume, as in ``experiment=high_uncertainty``; with smaller patches each patch has its own
per-image Dice, which this ignores); batch Dice pools ``data.batch_size`` independent draws of
the *same* image (a real batch mixes subjects, and under DDP spans all processes). With
``data.label_mode: soft`` the target is the label's probability map itself, so the loss is
deterministic (no draws).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from biasseg.losses import CompoundLoss, CrossEntropyLoss, SoftDiceLoss
from biasseg.theory.expected_loss import LossSpec, implied_volumes
from biasseg.theory.groups import VoxelGroups, case_groups, probability_map_groups, soft_target
from datamodules import MNI152DataModule, SyntheticDataModule
from datamodules.cases import Case
from datamodules.synthetic_volumes import SyntheticCase

NUM_DRAWS = 256  # label draws per validation case
BINS = 400  # probability (or distance-shell) bins per structure
SEED = 0  # seeds the label draws, per case index


def loss_spec(loss: nn.Module, batch_size: int, soft_targets: bool = False) -> LossSpec | None:
    """The :class:`LossSpec` of a loss module, ``None`` where the theory does not model it:
    class weights, focal loss, background scored, squared, DSC++, generalised Dice, the
    soft-label intersection with soft targets (``soft_targets``; with label maps it is the
    plain one), other losses. ``batch_size`` is the batch a batch Dice pools over."""
    if isinstance(loss, CrossEntropyLoss):
        return LossSpec(ce_weight=1.0) if loss.weight is None and loss.gamma == 0 else None
    if isinstance(loss, SoftDiceLoss):
        unmodelled = (loss.include_background or loss.squared or loss.error_exponent != 1
                      or loss.generalised is not None or (loss.soft_label and soft_targets))
        if unmodelled:
            return None
        return LossSpec(dice_weight=1.0, batch_size=int(batch_size) if loss.batch_dice else 1,
                        alpha=loss.alpha, beta=loss.beta, smooth_nr=loss.smooth_nr, smooth_dr=loss.smooth_dr,
                        calibrated=loss.calibrated_surrogate)
    if isinstance(loss, CompoundLoss):
        terms = [(loss.weights[name], loss_spec(term, batch_size, soft_targets)) for name, term in loss.terms.items()]
        if any(spec is None for _, spec in terms):
            return None
        overlap = {replace(s, ce_weight=0.0, dice_weight=1.0) for _, s in terms if s.dice_weight}
        if len(overlap) > 1:  # soft-overlap terms of different kinds
            return None
        return replace(
            next(iter(overlap), LossSpec()),
            ce_weight=sum(w * s.ce_weight for w, s in terms),
            dice_weight=sum(w * s.dice_weight for w, s in terms),
        )
    return None


def run_loss_spec(config: DictConfig) -> LossSpec | None:
    """The run's loss as the theory models it (:func:`loss_spec`), or None where the run is not
    modelled: a Tversky hypernetwork (its map is a marginal over α, not one loss's optimum) and
    several raters per image (their labels are a mixture of rater models, not one uncertainty
    model)."""
    if (config.get("model") or {}).get("hypernet") or int(config.data.get("raters", 0) or 0):
        return None
    soft_targets = config.data.get("label_mode", "hard") == "soft"
    return loss_spec(instantiate(config.loss), int(config.data.get("batch_size", 1)), soft_targets)


def groups_of(case: SyntheticCase | Case, rng: np.random.Generator) -> VoxelGroups:
    """A generated synthetic case by its own uncertainty kind; any other case with known
    class probabilities (MNI152) as the ``voxel`` kind of its foreground map."""
    if isinstance(case, SyntheticCase):
        return case_groups(case, NUM_DRAWS, rng, BINS)
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    return probability_map_groups(case.probabilities[1], voxel_ml, NUM_DRAWS, rng, BINS)


def validation_groups(data: Mapping, copies: int) -> list[VoxelGroups] | None:
    """The groups of every validation case of a synthetic or MNI152 data config with one
    foreground class; ``None`` for other data (folder data: the uncertainty is unknown).
    With ``label_mode: soft`` the target is the label's probabilities, ``copies`` times."""
    if not issubclass(get_class(data["_target_"]), (SyntheticDataModule, MNI152DataModule)):
        return None
    datamodule = instantiate(data)
    if datamodule.num_classes != 2:
        return None
    indices = range(datamodule.num_train, datamodule.num_train + datamodule.num_val)
    groups = [groups_of(datamodule.generate(i), np.random.default_rng([SEED, i])) for i in indices]
    return [soft_target(g, copies) for g in groups] if datamodule.label_mode == "soft" else groups


def predicted_volume_bias(run_config: DictConfig | Mapping) -> dict[str, float] | None:
    """``{"relative_soft", "relative_hard"}``: the mean over the run's validation cases of
    ``(volume − expected) / expected`` of the soft (``Σ p``) and hard (``Σ [p > 0.5]``) volume
    at the optimum of the run's expected loss; ``None`` for losses or data not modelled.

    ``run_config`` is a run's composed config (``data`` with ``_target_`` and ``batch_size``,
    ``loss`` with ``_target_``), as a DictConfig or a plain dict.
    """
    config = run_config if isinstance(run_config, DictConfig) else OmegaConf.create(dict(run_config))
    spec = run_loss_spec(config)
    if spec is None:
        return None
    groups = validation_groups(config.data, spec.batch_size)
    if not groups:
        return None
    volumes = [implied_volumes(g, spec) for g in groups]
    return {
        "relative_soft": float(np.mean([v.relative_soft for v in volumes])),
        "relative_hard": float(np.mean([v.relative_hard for v in volumes])),
    }
