"""Train a 3D U-Net with a configurable loss and report Dice and volume bias per subject.

    python train.py                          # embedded synthetic data, cross-entropy
    python train.py loss=softdice trainer.max_epochs=5
    python train.py -m loss=ce,softdice seed=0,1,2

Configuration: configs/train.yaml and its groups (see docs/configuration.md).
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from biasseg.callbacks import ResultsWriter
from biasseg.cli import CONFIGS, check_command_line
from biasseg.config_keys import EXECUTION_DATA_KEYS, differing_keys
from biasseg.errors import InputError, exit_on_input_error
from biasseg.loggers.run_log import build_trainer, route_library_output
from biasseg.renamed_targets import current_targets
from datamodules import SegmentationDataModule
from lightning_modules import SegmentationModule
from lightning_modules.checkpoints import load_untrusted, read_checkpoint

log = logging.getLogger(__name__)


def instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a callbacks/logger group (null entries skipped)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def checked_loss(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """The configured loss, tried once on a tiny input with the data's classes, so that a
    setting that does not fit them (e.g. ``loss.weight`` of another length) fails now, not
    at the first training step after preprocessing."""
    loss = instantiate(cfg.loss)
    logits = torch.zeros(1, num_classes, 2, 2, 2)
    try:
        loss(logits, torch.zeros(1, 1, 2, 2, 2, dtype=torch.long))
    except InputError as error:
        raise InputError(f"loss={cfg.loss.get('_target_', '?')} with {num_classes} classes: {error}") from None
    return loss


def build_model(cfg: DictConfig, datamodule: SegmentationDataModule) -> SegmentationModule:
    """The configured model and loss, shaped by what the data provides (channels, classes, patch)."""
    stages = len(cfg.model.get("features") or [])
    planned = datamodule.network_plan(stages) if stages else {}
    return instantiate(
        cfg.model,
        **{key: value for key, value in planned.items() if cfg.model.get(key) is None},  # the plan fills what is not set
        **({"regions": datamodule.regions, "regions_class_order": datamodule.regions_class_order} if datamodule.regions else {}),
        loss=checked_loss(cfg, datamodule.num_classes),
        in_channels=datamodule.in_channels,
        num_classes=datamodule.num_classes,
        class_names=datamodule.class_names,
        sliding_window=datamodule.sliding_window_settings(),
        volume_quote=OmegaConf.to_container(cfg.volume_quote) if cfg.get("volume_quote") is not None else None,
        lesions=cfg.get("lesions"),
    )


# What may change when a run continues in its directory: how long it trains, where and on
# what it runs, how it logs. Everything else (data, model, loss, optimiser, seed) must match.
RESUME_INDEPENDENT = (
    "ckpt_path", "auto_resume", "logger", "callbacks", "paths", "hparams_search", "optimized_metric", "volume_bias_penalty",
    "volume_bias_key", "trainer.max_epochs", "trainer.max_steps", "trainer.devices", "trainer.num_nodes",
    "trainer.accelerator", "trainer.strategy", "model.compile", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.check_val_every_n_epoch", "trainer.log_every_n_steps", "trainer.num_sanity_val_steps", "volume_quote", "lesions",
    *(f"data.{key}" for key in EXECUTION_DATA_KEYS),
)


def resume_independent(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in RESUME_INDEPENDENT)


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """``cfg.ckpt_path``; else, with ``auto_resume``, the newest checkpoint this run directory
    holds: ``checkpoints/last.ckpt`` (every epoch and on SIGTERM) or Lightning's SLURM
    ``hpc_ckpt_N.ckpt`` (on the requeue signal), so that a requeued job continues. It must
    come from the same configuration: two different runs inside one SLURM job share the
    job id, and must not resume from each other."""
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path, mmap=True)  # refuses pickled code and files that are not our checkpoints, in one line
        return str(Path(cfg.ckpt_path).expanduser())
    if not cfg.get("auto_resume"):
        return None
    output_dir = Path(cfg.paths.output_dir)
    found = [*output_dir.glob("hpc_ckpt_*.ckpt"), *output_dir.glob("checkpoints/last.ckpt")]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime_ns)
    stored = load_untrusted(newest, what="auto_resume found", mmap=True).get("run_config", {})
    if not isinstance(stored, dict):
        raise InputError(f"auto_resume found={newest}: not a checkpoint written by train.py (no run_config)")
    stored = current_targets(stored)
    current = OmegaConf.to_container(cfg, resolve=True)
    differ = [k for k in differing_keys(stored, current) if not resume_independent(k)]
    if differ:
        raise InputError(
            f"{output_dir} already holds {newest.name} of a run with another configuration "
            f"(differs in {', '.join(differ[:5])}); give this run its own hydra.run.dir, "
            "or set auto_resume=false to start over in it (training length, devices, workers and loggers may change)"
        )
    log.info(f"Resuming from {newest} (auto_resume)")
    return str(newest)


def run_identity(cfg: DictConfig) -> dict[str, object]:
    """What a run is, as top-level fields for dashboards: task, loss, data, experiment (the
    config groups' chosen options where Hydra knows them) and seed; ``sweep``, the multirun
    folder, when the run is one point of a sweep."""
    choices: dict = {}
    sweep = None
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        choices = dict(hydra_cfg.runtime.choices)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            sweep = Path(hydra_cfg.sweep.dir).name
    loss_class = str(cfg.loss.get("_target_", "?")).rsplit(".", 1)[-1]
    return {
        "task": cfg.get("task_name"),
        "loss_name": choices.get("loss") or loss_class,
        "data_name": choices.get("data") or str(cfg.data.get("_target_", "?")).rsplit(".", 1)[-1],
        "experiment": choices.get("experiment"),
        "seed": cfg.get("seed"),
        "sweep": sweep,
    }


def name_wandb_run(cfg: DictConfig, identity: dict[str, object]) -> None:
    """Fill the wandb logger's unset ``group``, ``tags`` and ``name`` from the run: a sweep's
    runs share a group (task and sweep folder), tags say task, loss, data and seed, so a
    multirun of losses × seeds is grouped and filterable without hand work."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is None:
        return
    loss, task, seed = identity["loss_name"], identity["task"], identity["seed"]
    with open_dict(cfg):
        if not wandb_cfg.get("group"):
            wandb_cfg.group = f"{task}/{identity['sweep']}" if identity["sweep"] else str(task)
        if not wandb_cfg.get("tags"):
            wandb_cfg.tags = [str(t) for t in (task, loss, identity["data_name"], identity["experiment"], f"seed{seed}") if t]
        if not wandb_cfg.get("name"):
            wandb_cfg.name = f"{task}/{loss}/seed{seed}"


def finish_wandb(logger: WandbLogger, exit_code: int) -> None:
    """Close the logger's wandb run. On SIGTERM SLURM signals wandb's service process too, which
    may be gone already: what it wrote stays (see configs/logger/wandb.yaml), and the stop itself
    must not turn into another error."""
    try:
        logger.experiment.finish(exit_code=exit_code)
    except Exception as error:  # the service died with the job's other processes
        log.warning(f"wandb run not closed cleanly ({type(error).__name__}); its records up to the last flush are kept")


def validate_the_last_epoch_if_cut(trainer: pl.Trainer, model: SegmentationModule, datamodule) -> None:
    """Validate the final weights when the last epoch's validation is due but did not happen.

    A run stopped (SIGTERM, requeue) during its last epoch's validation has trained every
    batch; resumed, Lightning counts the epoch as done and ends at once, so without this the
    run would end with an earlier epoch's validation in metrics.json."""
    every, last = trainer.check_val_every_n_epoch, (trainer.max_epochs or 0) - 1
    due = every is not None and last >= 0 and (last + 1) % every == 0 and trainer.limit_val_batches != 0
    if trainer.state.status == "finished" and due and model.validated_epoch != last and trainer.current_epoch >= last:
        log.info(f"the last epoch's validation was cut short before the resume: validating epoch {last} now")
        writers = [c for c in trainer.callbacks if isinstance(c, ResultsWriter)]
        for writer in writers:  # after fit the trainer's epoch counter is one past the last epoch
            writer.fields["epoch"] = last
        trainer.validate(model, datamodule=datamodule, verbose=False)
        for writer in writers:
            del writer.fields["epoch"]
            writer.print_summary(trainer, model)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model described by ``cfg``; returns the last validation summary (``val/…`` keys)."""
    route_library_output()
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resume_checkpoint(cfg)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    model.run_config = run_config
    identity = run_identity(cfg)
    name_wandb_run(cfg, identity)
    log.info(
        f"task {identity['task']} · loss {identity['loss_name']} · data {identity['data_name']} · "
        f"model {list(cfg.model.get('features', []))} · {cfg.trainer.get('max_epochs')} epochs on {cfg.trainer.get('accelerator')} · "
        f"seed {cfg.get('seed')} · writing to {cfg.paths.output_dir}"
    )
    loggers = instantiate_all(cfg.get("logger"))
    trainer = build_trainer(cfg.trainer, instantiate_all(cfg.get("callbacks")), loggers)
    for logger in trainer.loggers:
        logger.log_hyperparams({**identity, **run_config})
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # never unpickle code
        validate_the_last_epoch_if_cut(trainer, model, datamodule)
    finally:
        # close the wandb run, flushing what it holds: so that sweeps start fresh runs, and so
        # that a run stopped by SIGTERM (preemption, requeue) keeps what it logged before
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                finish_wandb(logger, exit_code=0 if trainer.state.status == "finished" else 1)
    return {f"val/{k}": v for k, v in (model.validation_summary or {}).items()}


def objective(summary: dict[str, float], cfg: DictConfig) -> float | None:
    """The value Hydra's sweepers optimise: ``optimized_metric``, less ``volume_bias_penalty`` ×
    |``volume_bias_key``| where a penalty is set (see configs/hparams_search/)."""
    value = summary.get(cfg.get("optimized_metric"))
    penalty = float(cfg.get("volume_bias_penalty") or 0.0)
    if value is None or penalty == 0:
        return value
    bias = summary.get(cfg.get("volume_bias_key"))
    if bias is None:
        raise InputError(f"volume_bias_key={cfg.get('volume_bias_key')} is not a logged key of this run")
    return value - penalty * abs(bias)


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = exit_on_input_error(lambda: train(cfg))
    except SIGTERMException:  # Lightning exits with status 0 here; schedulers must see the stop
        sys.exit(128 + signal.SIGTERM)
    return objective(summary, cfg)


def cli() -> None:
    """``python train.py …`` and the console script ``biasseg-train``: misspelt keys and ``--help`` first, then Hydra."""
    check_command_line("train")
    main()
