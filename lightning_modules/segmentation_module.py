"""The segmentation LightningModule: patch training, whole-volume validation per subject."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchio as tio
from torch import nn

from biasseg.errors import InputError
from biasseg.losses.regions import region_loss
from biasseg.metrics import SubjectSegmentationMetrics, per_subject, summarize
from biasseg.metrics.lesion_metrics import LesionMetrics, lesion_epoch_summary, lesion_table
from biasseg.metrics.lesions import lesion_settings
from biasseg.metrics.region_metrics import RegionMetrics, per_region_subject
from biasseg.metrics.volume_quote import (
    METHODS,
    TARGET_CHOICES,
    CalibrationMaps,
    VolumeCalibration,
    apply_stored,
    cross_fit,
    quote_target,
    verdict,
)
from lightning_modules.callback_state import confine_callback_state
from lightning_modules.poly_schedule import replan
from lightning_modules.predictor import Predictor
from lightning_modules.sliding_window import SlidingWindow
from lightning_modules.unet import UNet3D


def preview_slices(subject: tio.Subject, probabilities: torch.Tensor) -> dict:
    """Axial and coronal slices (numpy) through the reference's largest foreground extent.

    ``image`` (first channel), ``label`` and ``prediction`` as foreground masks (any class),
    ``probability`` = 1 − p(background); ``aspect`` is the displayed height/width ratio.
    Only the two slices leave the device.
    """
    image = subject["image"][tio.DATA][0]
    label = subject["label"][tio.DATA][0] > 0
    sx, sy, sz = subject["label"].spacing
    has_label = bool(label.any())
    axial = int(label.sum((0, 1)).argmax()) if has_label else image.shape[2] // 2
    coronal = int(label.sum((0, 2)).argmax()) if has_label else image.shape[1] // 2

    def plane(index: tuple, aspect: float) -> dict:
        p = probabilities[(slice(None), *index)]
        return {
            "image": image[index].float().numpy(),
            "label": label[index].numpy(),
            "prediction": (p.argmax(0) > 0).cpu().numpy(),
            "probability": (1 - p[0]).cpu().numpy(),
            "aspect": aspect,
        }

    return {
        "name": subject["name"],
        "index": int(subject["subject_index"]),
        "axial": plane((slice(None), slice(None), axial), sy / sx),
        "coronal": plane((slice(None), coronal, slice(None)), sz / sx),
    }


def hypernet_settings(hypernet: Mapping | None, loss: nn.Module) -> dict | None:
    """The checked hypernetwork settings (see :class:`SegmentationModule`), or None."""
    if hypernet is None:
        return None
    from biasseg.losses import SoftDiceLoss

    if not isinstance(loss, SoftDiceLoss):
        raise InputError(f"model.hypernet trains with a Tversky loss: use loss=tversky (a SoftDiceLoss), not {type(loss).__name__}")
    unknown = set(hypernet) - {"alpha_range", "inference_alphas"}
    if unknown:
        raise InputError(f"model.hypernet: unknown keys {sorted(unknown)}; it takes alpha_range and inference_alphas")
    low, high = (float(a) for a in hypernet.get("alpha_range", (0.05, 0.95)))
    alphas = [float(a) for a in hypernet.get("inference_alphas", [round(0.1 * i, 1) for i in range(1, 10)])]
    if not 0.0 <= low <= high <= 1.0:
        raise InputError(f"model.hypernet.alpha_range must be [low, high] within [0, 1], got {[low, high]}")
    if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):
        raise InputError(f"model.hypernet.inference_alphas must be values in [0, 1], got {alphas}")
    return {"alpha_range": [low, high], "inference_alphas": alphas}


def quote_settings(settings: Mapping | None) -> dict:
    """The checked ``volume_quote`` settings (see :class:`SegmentationModule`)."""
    settings = dict(settings or {})
    unknown = set(settings) - {"method", "alpha", "folds", "target"}
    if unknown:
        raise InputError(f"volume_quote: unknown keys {sorted(unknown)}; it takes method, alpha, folds and target")
    method, alpha, folds = settings.get("method", "platt"), settings.get("alpha", 0.1), settings.get("folds", 5)
    target = settings.get("target", "auto")
    if method not in METHODS:
        raise InputError(f"volume_quote.method must be one of {METHODS}, got {method!r}")
    if target not in TARGET_CHOICES:
        raise InputError(f"volume_quote.target must be one of {TARGET_CHOICES}, got {target!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InputError(f"volume_quote.alpha must be in (0, 1) (0.1: a 90 % interval), got {alpha!r}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise InputError(f"volume_quote.folds must be a whole number >= 2, got {folds!r}")
    return {"method": method, "alpha": float(alpha), "folds": folds, "target": target}


OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class SegmentationModule(pl.LightningModule):
    """3D U-Net trained with a pluggable loss; validated on whole volumes every epoch.

    Args:
        loss: called as ``loss(logits (B, C, W, H, D), target)``, the target a label map
            ``(B, 1, W, H, D)`` or class probabilities ``(B, C, W, H, D)`` (soft labels).
        in_channels, num_classes: image channels; classes including background.
        features: channels per U-Net stage.
        deep_supervision: also supervise the coarser decoder outputs (nnU-Net weights
            ``1/2^i``, normalised), with nearest-neighbour downsampled label maps or
            area-averaged class probabilities.
        optimizer: ``params → Optimizer`` (a Hydra partial).
        scheduler: ``optimizer → LRScheduler`` (a Hydra partial), stepped every optimiser
            step; ``total_iters``/``T_max`` are filled with the run's total steps.
        sliding_window: :class:`SlidingWindow` settings for validation.
        class_names: names of the foreground classes, for per-class metric keys.
        preview_subjects: keep slices of this many validation subjects for pictures.
        soft_volume_margin_mm: the near-structure soft volume sums ``p`` within this many mm of
            the predicted structure (see :mod:`biasseg.metrics.subject_metrics`).
        strides, kernel_sizes: the U-Net's per-stage strides and kernel sizes per axis
            (:class:`~lightning_modules.unet.UNet3D`); None = 2 and 3 along every axis.
        regions, regions_class_order: nnU-Net region labels (``data=folder`` whose ``dataset.json``
            declares them): the label values each foreground class covers, one sigmoid output
            each (:mod:`biasseg.losses.regions`, :mod:`biasseg.metrics.region_metrics`); the label value each
            writes on export. None: exclusive classes, softmax.
        hypernet: Hong et al.'s Tversky hypernetwork (2021), or None: ``alpha_range`` ``[low,
            high]`` from which one ``α`` is drawn per training batch, the network conditioned on
            it (:class:`~lightning_modules.unet.UNet3D`, FiLM) and the loss (a
            :class:`~biasseg.losses.SoftDiceLoss`) weighing false positives by ``α`` and false negatives
            by ``1 − α``; ``inference_alphas``, the ``α`` whose probability maps are averaged at
            inference (the marginal map; each one is a sample for the generalised energy
            distance; :class:`~lightning_modules.predictor.Predictor`).
        volume_quote: how validation recalibrates and bounds each subject's soft volume
            (:mod:`biasseg.metrics.volume_quote`): ``method`` (one of ``none``, ``temperature``,
            ``platt``, ``isotonic``), ``alpha`` (the interval's miscoverage), ``folds``
            (cross-fitting folds over the validation subjects), ``target`` (what the quote is
            calibrated to: ``reference``, the label; ``raters_mean``, the raters' mean map and
            volume, several raters only; ``auto``, the raters' mean where there are several).
        compile: ``torch.compile`` the network's training forward pass (opt-in; the first
            steps pay the compilation; weights, checkpoints and inference are unchanged).
        lesions: lesion-wise measures at every validation (:mod:`biasseg.metrics.lesions`,
            configs/lesions/), or None; like ``volume_quote`` a measurement setting, not stored
            in the hyper-parameters.

    Validation predicts through :attr:`predictor`: this network alone (a hypernetwork's
    marginal), unless evaluate.py sets a :class:`~lightning_modules.predictor.Predictor` of an
    ensemble or of cross-validation folds.

    After each validation epoch ``validation_rows`` holds the per-subject rows (CPU tensors,
    see :mod:`biasseg.metrics.subject_metrics`), ``validation_reliability`` the pooled reliability
    bins, ``validation_summary`` the logged values and, with lesion measures,
    ``validation_lesions`` their rows (:mod:`biasseg.metrics.lesion_metrics`).
    """

    def __init__(
        self,
        loss: nn.Module,
        in_channels: int,
        num_classes: int,
        features: Sequence[int] = (8, 16, 32, 64),
        deep_supervision: bool = False,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        sliding_window: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        preview_subjects: int = 2,
        soft_volume_margin_mm: float = 10.0,
        hypernet: Mapping[str, Sequence[float]] | None = None,
        strides: Sequence[Sequence[int]] | None = None,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
        regions: Sequence[Sequence[int]] | None = None,
        regions_class_order: Sequence[int] | None = None,
        volume_quote: Mapping[str, Any] | None = None,
        lesions: Mapping[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler", "volume_quote", "lesions", "compile"])
        self.volume_quote = quote_settings(volume_quote)
        self.hypernet = hypernet_settings(hypernet, loss)
        self.regions = None if regions is None else [[int(v) for v in r] for r in regions]
        self.regions_class_order = None if regions_class_order is None else [int(v) for v in regions_class_order]
        if self.regions is not None and (len(self.regions) != num_classes - 1 or len(self.regions_class_order or []) != len(self.regions)):
            raise InputError(f"{len(self.regions)} regions and regions_class_order {self.regions_class_order} for "
                             f"{num_classes - 1} foreground classes: one region and one order value per class")
        outputs = num_classes if self.regions is None else len(self.regions)  # regions: one sigmoid each, no background
        self.net = UNet3D(in_channels, outputs, features, deep_supervision, conditioned=self.hypernet is not None,
                          strides=strides, kernel_sizes=kernel_sizes)
        self.loss = loss
        # opt-in torch.compile of the training forward pass: a compiled function, not a module, so
        # the weights, checkpoints and inference stay those of self.net
        self.compiled_forward = torch.compile(self.net.forward) if compile else None
        self.predictor: Predictor | None = None  # evaluate.py: an ensemble's or folds' predictor; None = this network
        self.epoch_loss = torch.zeros(2)  # this epoch's (Σ loss × batch size, Σ batch size) on this rank
        self.epoch_loss_epoch: int | None = None  # the epoch epoch_loss belongs to
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        window = dict(sliding_window or {"patch_size": (32, 32, 32)})
        window["patch_size"] = tuple(int(p) for p in window["patch_size"])
        self.sliding_window = SlidingWindow(**window)
        if any(p % d for p, d in zip(self.sliding_window.patch_size, self.net.size_divisors)):
            raise InputError(
                f"patch size {list(self.sliding_window.patch_size)} must be divisible by {list(self.net.size_divisors)} "
                f"for a U-Net with {len(self.net.features)} stages (model.features) and strides {self.net.strides}"
            )
        self.class_names = list(class_names or [f"class{c}" for c in range(1, num_classes)])
        if len(self.class_names) != num_classes - 1:
            raise InputError(f"{len(self.class_names)} class names for {num_classes - 1} foreground classes")
        self.val_metrics = self.new_metrics()
        self.val_lesions: LesionMetrics | None = None
        self.validation_lesions: torch.Tensor | None = None  # (n, len(ROW_COLUMNS)) rows of the last validation
        self.measure_lesions(lesions)
        self.validation_rows: dict[str, torch.Tensor] | None = None
        self.validation_reliability: torch.Tensor | None = None  # (C − 1, bins, 3), see metrics.calibration
        self.validation_summary: dict[str, float] | None = None
        self.validated_epoch: int | None = None  # the epoch of validation_summary (None: the sanity check)
        self.preview_subjects = int(preview_subjects)
        self.validation_previews: list[dict] = []
        self._previews: list[dict] = []
        self.run_config: dict | None = None  # the resolved run config, stored in checkpoints
        self.stored_calibration: VolumeCalibration | None = None  # evaluate.py: a trained model's calibration, applied as is
        self.volume_calibration: VolumeCalibration | None = None  # fitted at the last validation (cross-fitted)
        self.soft_bias_history: list[float] = []  # the relative soft-volume bias of every validation (the verdict's trend)
        self.calibration_verdict: str | None = None

    def new_metrics(self, raters: int = 0) -> SubjectSegmentationMetrics | RegionMetrics:
        """Validation's per-subject metrics: per class, or per region (:mod:`biasseg.metrics.region_metrics`)."""
        if self.regions is not None:
            return RegionMetrics(self.regions, self.hparams.soft_volume_margin_mm)
        return SubjectSegmentationMetrics(self.hparams.num_classes, self.hparams.soft_volume_margin_mm, num_raters=raters)

    def measure_lesions(self, config: Mapping[str, Any] | None) -> None:
        """Measure lesions at every validation with these settings (configs/lesions/), or not (None)."""
        settings = lesion_settings(config, self.hparams.soft_volume_margin_mm)
        self.val_lesions = None if settings is None else LesionMetrics(settings, self.regions)

    def lesion_table(self, subject_names: Sequence[str]) -> list[dict] | None:
        """The last validation's lesions as ``lesions.csv`` rows (subjects named by index), or None
        without lesion measures."""
        if self.val_lesions is None or self.validation_lesions is None:
            return None
        return lesion_table(self.validation_lesions, subject_names, self.class_names, self.val_lesions.settings)

    @property
    def activation(self) -> str:
        """How logits become probabilities: ``softmax`` over classes, or ``sigmoid`` per region."""
        return "softmax" if self.regions is None else "sigmoid"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, W, H, D)`` for images ``(B, in_channels, W, H, D)``."""
        return self.net(x)

    def setup(self, stage: str) -> None:
        """Measure against every rater where the data has several (``datamodule.num_raters``)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        raters = int(getattr(datamodule, "num_raters", 0) or 0)
        if raters != self.val_metrics.num_raters and self.regions is None:
            self.val_metrics = self.new_metrics(raters)

    # --- training ---------------------------------------------------------------------
    def compute_loss(self, output: torch.Tensor | list[torch.Tensor], target: torch.Tensor, **loss_options) -> torch.Tensor:
        """The loss of the logits (or the deep-supervision list of them); ``loss_options`` are
        passed to the loss (the hypernetwork's ``alpha``/``beta``)."""
        if self.regions is not None:  # each region a binary problem of its own (losses.regions)
            return self.scaled_loss(output, target, lambda logits, scaled: region_loss(self.loss, logits, scaled, self.regions,
                                                                                         **loss_options))
        return self.scaled_loss(output, target, lambda logits, scaled: self.loss(logits, scaled, **loss_options))

    @staticmethod
    def scaled_loss(output: torch.Tensor | list[torch.Tensor], target: torch.Tensor,
                    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``loss(logits, target)``, or over deep supervision's list of logits the weighted sum
        with the target scaled to each output."""
        if isinstance(output, torch.Tensor):
            return loss(output, target)
        weights = [0.5**i for i in range(len(output))]
        total = 0.0
        for weight, logits in zip(weights, output):
            if logits.shape[2:] != target.shape[2:] and target.is_floating_point():
                # class probabilities: averaged, so every scale keeps the expected volume Σq
                scaled = F.interpolate(target, size=logits.shape[2:], mode="area")
            elif logits.shape[2:] != target.shape[2:]:
                scaled = F.interpolate(target.float(), size=logits.shape[2:], mode="nearest").to(target.dtype)
            else:
                scaled = target
            total = total + weight / sum(weights) * loss(logits, scaled)
        return total

    def training_alpha(self) -> float:
        """The hypernetwork's ``α`` for this step: uniform on ``alpha_range``, one per batch (Hong
        et al.), drawn from (seed, step, rank) so that a resumed run draws the same ones."""
        low, high = self.hypernet["alpha_range"]
        rng = np.random.default_rng([torch.initial_seed() % 2**32, int(self.global_step), int(self.global_rank)])
        return float(rng.uniform(low, high))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image = batch["image"][tio.DATA]
        label = batch["label"][tio.DATA]
        forward = self.compiled_forward or self.net
        if self.hypernet is None:
            loss = self.compute_loss(forward(image), label)
        else:
            alpha = self.training_alpha()
            loss = self.compute_loss(forward(image, alpha), label, alpha=alpha, beta=1 - alpha)
        # summed on the device, logged as the epoch mean in on_train_epoch_end: a per-step value
        # would make Lightning read the loss back to the host (a synchronisation) every step
        self.epoch_loss += torch.stack([loss.detach().float() * image.shape[0], loss.new_tensor(float(image.shape[0]))])
        return loss

    def on_train_epoch_start(self) -> None:
        # an epoch resumed in its middle keeps the sums of its batches before the stop (on_load_checkpoint)
        kept = self.epoch_loss if self.epoch_loss_epoch == self.current_epoch else torch.zeros(2)
        self.epoch_loss, self.epoch_loss_epoch = kept.to(self.device), self.current_epoch
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        """Log ``train/loss``, the epoch's mean over samples on all ranks. Kept by the module
        rather than by ``self.log(on_epoch=True)``: Lightning does not store its running means in
        a checkpoint, so an epoch resumed after a stop (SIGTERM, requeue) would log the mean of
        its remaining batches only, or nothing when the stop came after its last batch. Under
        DDP the checkpoint holds rank 0's sums, so a resumed epoch's mean counts the other
        ranks' batches from the resume on."""
        total, count = self.trainer.strategy.reduce(self.epoch_loss.to(self.device), reduce_op="sum").tolist()
        if count > 0:
            self.log("train/loss", total / count, prog_bar=True, sync_dist=False)

    # --- validation -------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, tio.Subject):  # whole subjects: tensors move in validation_step
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def probabilities(self, image: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        """This network's whole-volume probabilities ``(C, W, H, D)`` of ``image`` ``(channels,
        W, H, D)``, on the module's device; a hypernetwork's at ``alpha``."""
        image = image.to(self.device, non_blocking=True).float()
        if self.hypernet is None:
            return self.sliding_window(image, self.net, self.activation)
        return self.sliding_window(image, lambda patches: self.net(patches, alpha), self.activation)

    def segmentation(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The hard segmentation (uint8) of class probabilities: their argmax ``(W, H, D)``, or with
        regions each region's mask ``p > 0.5`` ``(R, W, H, D)``."""
        if self.regions is not None:
            return (probabilities > 0.5).to(torch.uint8)
        return probabilities.argmax(0).to(torch.uint8)

    def exported_labels(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The label map to write ``(W, H, D)``: the argmax, or with regions nnU-Net's export —
        ``regions_class_order[i]`` wherever region ``i`` is predicted, later regions over earlier ones."""
        if self.regions is None:
            return probabilities.argmax(0)
        labels = torch.zeros(probabilities.shape[1:], dtype=torch.long, device=probabilities.device)
        for value, p in zip(self.regions_class_order, probabilities):
            labels[p > 0.5] = value
        return labels

    def validation_step(self, subject: tio.Subject, batch_idx: int) -> None:
        """Segment the whole subject and measure it where it was annotated: a subject that
        carries its ``original_grid`` (data=folder) is scored on that grid against its original
        label, each voxel its own size (:mod:`datamodules.original_grid`); others on theirs."""
        predictor = self.predictor or Predictor([self])
        probabilities, samples = predictor.predict_with_samples(subject["image"][tio.DATA], case=subject["name"])
        if int(subject["subject_index"]) < self.preview_subjects:  # with regions: the first (outermost) one
            shown = probabilities if self.regions is None else torch.stack([1 - probabilities[0], probabilities[0]])
            self._previews.append(preview_slices(subject, shown))
        label, spacing = subject["label"][tio.DATA], subject["label"].spacing
        raters = subject["raters"][tio.DATA] if "raters" in subject else None
        grid = subject.get("original_grid")
        if grid is not None:
            affine = subject["image"].affine
            probabilities = grid.probabilities(probabilities, affine, background=self.regions is None)
            if samples is not None:  # (M, W, H, D), or (M, R, W, H, D) with regions
                samples = grid.segmentations(samples.flatten(0, samples.ndim - 4), affine).reshape(*samples.shape[:-3], *grid.shape)
            label, spacing, raters = subject["original_label"], grid.spacing, subject.get("original_raters")
        self.val_metrics.update(
            probabilities,
            label,
            spacing,
            int(subject["subject_index"]),
            subject.get("expected_volume_ml"),
            samples,
            raters,
        )
        if self.val_lesions is not None:
            expected = subject.get("label_distribution") if grid is None and self.regions is None else None
            self.val_lesions.update(probabilities, label, spacing, int(subject["subject_index"]), expected)

    def on_validation_epoch_end(self) -> None:
        rows, fitted = per_subject(self.val_metrics) if self.regions is None else per_region_subject(self.val_metrics)
        self.val_metrics.reset()
        histograms, voxel_ml, isotonic = fitted.pop("log_odds"), fitted.pop("voxel_ml"), fitted.pop("isotonic_map")
        settings = self.volume_quote
        several_raters = "raters_log_odds" in fitted
        stored = self.stored_calibration
        aim = stored.target if stored is not None else quote_target(settings["target"], several_raters)
        # the maps the verdict judges: fitted to what the quote aims at (the label, or the raters' mean map)
        judged = CalibrationMaps(fitted["temperature"], fitted["platt_slope"], fitted["platt_bias"], isotonic)
        if aim == "raters_mean" and several_raters:
            judged = CalibrationMaps.fit(fitted["raters_log_odds"])
        if stored is not None:  # a trained model's calibration, measured on new subjects
            rows.update(apply_stored(stored, histograms, voxel_ml))  # with the method chosen for it
            fitted["interval_alpha"] = torch.tensor(stored.alpha)
        else:
            target, reference = histograms, rows["volume_ref_ml"]
            if aim == "raters_mean":
                target, reference = fitted["raters_log_odds"], rows["volume_raters_mean_ml"]
            self.volume_calibration, quote_rows = cross_fit(target, voxel_ml, reference, settings["alpha"],
                                                            settings["folds"], settings["method"], maps=judged)
            self.volume_calibration.target = aim
            rows.update(quote_rows)
            fitted["interval_alpha"] = torch.tensor(settings["alpha"])
        summary = summarize(rows, self.class_names, fitted)
        if not self.trainer.sanity_checking:
            self.soft_bias_history.append(summary.get("soft_relative_volume_bias", float("nan")))
        quoted = stored or self.volume_calibration
        if quoted.uncertainty is not None:
            summary["recalibration_uncertainty"] = float(quoted.uncertainty.max())
        self.calibration_verdict, calibrated, settled = verdict(
            judged.temperature.tolist(), judged.platt_slope.tolist(), judged.platt_bias.tolist(),
            self.soft_bias_history, settings["method"], quoted)
        if self.val_lesions is not None:
            self.validation_lesions = self.val_lesions.compute()
            self.val_lesions.reset()
            summary.update(lesion_epoch_summary(self.validation_lesions, self.val_lesions.settings, rows["subject_index"].tolist()))
        summary["calibrated"] = float(calibrated)
        summary["volume_settled"] = float("nan") if settled is None else float(settled)
        for key, value in summary.items():
            self.log(f"val/{key}", value, prog_bar=key == "dice", sync_dist=True)
        self.validation_rows = {key: value.detach().cpu() for key, value in rows.items()}
        self.validation_reliability = fitted["reliability"].detach().cpu()
        self.validation_summary = summary
        self.validated_epoch = None if self.trainer.sanity_checking else self.current_epoch
        self.validation_previews, self._previews = sorted(self._previews, key=lambda p: p["index"]), []

    # --- optimisation -----------------------------------------------------------------
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise InputError("training needs an optimizer (model.optimizer in the config)")
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        accepted = inspect.signature(self.scheduler_factory).parameters
        length = {name: total_steps for name in ("total_iters", "T_max") if name in accepted}
        scheduler = self.scheduler_factory(optimizer, **length)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # A run resumed with a longer trainer.max_epochs ("extend it") restores its scheduler
        # planned for the old length: the poly decay would have ended (learning rate 0). Re-plan
        # it for the new length, at the step the run has reached.
        total = int(self.trainer.estimated_stepping_batches)
        for config in self.trainer.lr_scheduler_configs:
            replan(config.scheduler, total)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        dropped = confine_callback_state(checkpoint)
        if dropped:
            warnings.warn(f"the checkpoint's callback state named files outside its folder, ignored: {dropped[:3]}", stacklevel=2)
        # Resumed runs continue the patch stream exactly where the checkpoint stopped, also in
        # the middle of an epoch (SIGTERM, requeue), instead of replaying the epoch's batches.
        # "processed" counts the batches trained on (a checkpoint written at a batch's end has
        # not yet counted it as "completed").
        history = checkpoint.get("soft_bias_history")
        if isinstance(history, list) and len(history) < 100_000 and all(isinstance(v, float) for v in history):
            self.soft_bias_history = list(history)
        saved = checkpoint.get("epoch_loss")
        if isinstance(saved, dict) and isinstance(saved.get("epoch"), int) and isinstance(saved.get("sums"), list) \
                and len(saved["sums"]) == 2 and all(isinstance(v, float) and np.isfinite(v) for v in saved["sums"]):
            self.epoch_loss, self.epoch_loss_epoch = torch.tensor(saved["sums"]), saved["epoch"]
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        loops = checkpoint.get("loops")
        try:
            done = loops["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
            epoch = checkpoint["epoch"]
        except (KeyError, TypeError):
            return
        valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (done, epoch))
        if valid and datamodule is not None and hasattr(datamodule, "resume_from") and self.trainer.state.fn == "fit":
            datamodule.resume_from(epoch, done)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config
        checkpoint["soft_bias_history"] = [float(v) for v in self.soft_bias_history]  # the verdict's trend, across resumes
        if self.epoch_loss_epoch is not None:  # the running epoch's loss sums, for a resume in its middle
            checkpoint["epoch_loss"] = {"epoch": self.epoch_loss_epoch, "sums": [float(v) for v in self.epoch_loss.tolist()]}
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "inference_settings"):
            checkpoint["inference_settings"] = datamodule.inference_settings()
        if datamodule is not None and hasattr(datamodule, "split_record"):  # the cases it trained on (evaluate.py's leak check)
            checkpoint["data_split"] = datamodule.split_record()
