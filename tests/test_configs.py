"""Every config option composes and instantiates; bad choices fail with Hydra's clear errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from helpers import CONFIG_DIR, ROOT, TINY, compose_config
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.utils import instantiate

from biasseg.errors import InputError
from biasseg.generated_folders import write_msd
from biasseg.losses import SoftDiceLoss
from biasseg.pipelines.train import build_model
from datamodules import SegmentationDataModule
from lightning_modules import SegmentationModule

GROUPS = ["data", "model", "loss", "trainer", "logger", "callbacks", "experiment", "lesions"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"configs/{group}/ is empty"


@pytest.mark.parametrize("loss", options("loss"))
@pytest.mark.parametrize("model", options("model"))
def test_losses_and_models_instantiate(loss, model, tmp_path):
    cfg = compose_config([f"loss={loss}", f"model={model}", "data.patch_size=[32,32,32]"], tmp_path)
    datamodule = instantiate(cfg.data)
    if model == "tversky_hypernet" and not isinstance(instantiate(cfg.loss), SoftDiceLoss):
        with pytest.raises((InputError, InstantiationException), match="model.hypernet trains with a Tversky loss: use loss=tversky"):
            build_model(cfg, datamodule)
        return
    module = build_model(cfg, datamodule)
    assert isinstance(module, SegmentationModule)
    assert list(module.net.features) == list(cfg.model.features)


def data_overrides(data: str, tmp_path: Path) -> list[str]:
    """What a data option needs beyond its defaults (a dataset folder for data=folder)."""
    if data == "folder":
        return [f"data.root={write_msd(tmp_path / 'dataset')}", f"data.cache_dir={tmp_path / 'cache'}"]
    return []


@pytest.mark.parametrize("data", options("data"))
def test_data_instantiates(data, tmp_path):
    cfg = compose_config([f"data={data}", *data_overrides(data, tmp_path)], tmp_path)
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, SegmentationDataModule)
    if cfg.data.patch_size is None:  # data=folder plans it from the dataset's fingerprint
        assert data == "folder" and len(datamodule.sliding_window_settings()["patch_size"]) == 3
    else:
        assert datamodule.patch_size == tuple(cfg.data.patch_size)
    assert len(datamodule.augmentation) == 4


@pytest.mark.parametrize("logger", options("logger"))
def test_loggers_instantiate_and_log(logger, tmp_path):
    cfg = compose_config([f"logger={logger}"], tmp_path)
    nodes = [node for node in (cfg.get("logger") or {}).values() if node is not None]
    assert (logger == "none") == (not nodes)
    for node in nodes:
        built = instantiate(node)
        assert isinstance(built, pl.loggers.Logger) and type(built).__name__ == node._target_.rsplit(".", 1)[-1]
        if isinstance(built, pl.loggers.WandbLogger):
            continue  # logging starts wandb's process-wide service, which later tests' offline runs need fresh (test_loggers_and_figures logs to it)
        built.log_metrics({"val/dice": 0.5}, step=0)
        built.finalize("success")
    if logger == "csv":  # the run's metrics land in its own folder, where report.py reads them
        assert "val/dice" in (tmp_path / "csv" / "metrics.csv").read_text()


@pytest.mark.parametrize("trainer", ["default", "cpu"])
def test_cpu_trainers_instantiate(trainer, tmp_path):
    cfg = compose_config([f"trainer={trainer}"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("trainer", options("trainer"))
def test_all_trainers_compose(trainer, tmp_path):
    cfg = compose_config([f"trainer={trainer}"], tmp_path)
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert cfg.trainer.use_distributed_sampler is False  # the datamodule shards subjects itself


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_callbacks_instantiate(callbacks, tmp_path):
    cfg = compose_config([f"callbacks={callbacks}"], tmp_path)
    nodes = [node for node in (cfg.get("callbacks") or {}).values() if node is not None]
    assert (callbacks == "none") == (not nodes)
    built = [instantiate(node) for node in nodes]
    assert all(isinstance(c, pl.Callback) and type(c).__name__ == n._target_.rsplit(".", 1)[-1] for c, n in zip(built, nodes))
    if callbacks == "default":  # what a run's outputs depend on
        kinds = {type(c).__name__ for c in built}
        assert {"ModelCheckpoint", "ResultsWriter", "VolumeCalibrationWriter", "CheckpointOnSigterm"} <= kinds
        last = next(c for c in built if isinstance(c, pl.callbacks.ModelCheckpoint) and c.filename == "last")
        assert last.monitor is None and last.dirpath == str(tmp_path / "checkpoints")  # last.ckpt follows every epoch


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose_and_instantiate(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    datamodule = instantiate(cfg.data)
    module = build_model(cfg, datamodule)
    assert cfg.task_name == experiment  # each experiment reports under its own name
    assert (module.hparams.num_classes, module.class_names) == (datamodule.num_classes, datamodule.class_names)
    assert module.sliding_window.patch_size == tuple(datamodule.sliding_window_settings()["patch_size"])


def test_documented_keys_override(tmp_path):
    cfg = compose_config(
        ["seed=7", "trainer.max_epochs=3", "trainer.accelerator=cpu", "trainer.devices=1",
         "trainer.precision=bf16-mixed", "model.features=[4,8,16]", "data.patch_size=[16,16,8]",
         "data.batch_size=3", "data.samples_per_volume=5", "data.num_workers=0", "ckpt_path=/x/last.ckpt",
         "data.uncertainty=0"],
        tmp_path,
    )
    assert (cfg.seed, cfg.trainer.max_epochs, cfg.trainer.precision, cfg.ckpt_path) == (7, 3, "bf16-mixed", "/x/last.ckpt")
    datamodule = instantiate(cfg.data)
    assert (datamodule.patch_size, datamodule.batch_size, datamodule.samples_per_volume) == ((16, 16, 8), 3, 5)
    assert datamodule.num_workers == 0


def test_unknown_option_lists_the_choices():
    with pytest.raises(MissingConfigException) as error:
        compose_config(["loss=nosuch"])
    message = str(error.value)
    assert "nosuch" in message and "softdice_batch" in message and "ce_softdice" in message


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="max_epoch"):
        compose_config(["trainer.max_epoch=3"])


def test_patch_not_divisible_by_the_unet_is_a_clear_error(tmp_path):
    cfg = compose_config(TINY + ["model.features=[4,8,16,32]", "data.patch_size=[12,16,16]"], tmp_path)
    datamodule = instantiate(cfg.data)
    with pytest.raises(InstantiationException, match=r"divisible by \[8, 8, 8\]"):
        build_model(cfg, datamodule)


def test_the_manual_lists_every_option():
    """docs/configuration.md's group table has a row per group listing exactly its options."""
    manual = (Path(CONFIG_DIR).parent / "docs" / "configuration.md").read_text().splitlines()
    for group in GROUPS:
        row = next((line for line in manual if line.startswith(f"| `{group}` |")), None)
        assert row is not None, f"docs/configuration.md's group table has no row for {group}"
        listed = set(re.findall(r"`([\w-]+)`", row.split("|")[2]))
        assert listed == set(options(group)), f"docs/configuration.md's {group} row lists {sorted(listed)}, configs/{group}/ holds {options(group)}"


def test_slurm_launcher_follows_the_trainer():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2",
                                          "trainer.num_nodes=3"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (2, 2, 3)
    assert launcher.max_num_timeout > 0  # requeued after time limit / preemption
    assert "SlurmLauncher" in launcher._target_


def test_help_shows_the_configs_comments():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for text in ("trainer.max_epochs", "training epochs", "data.patch_size", "loss=softdice", "model.optimizer.lr",
                 "experiment=large_field_of_view", "hparams_search=dice_optuna"):
        assert text in result.stdout, text


@pytest.mark.parametrize("script,argument,suggestion", [
    ("train.py", "trainer.max_epoch=3", "trainer.max_epochs"),
    ("train.py", "data.patch_sise=[16,16,16]", "data.patch_size"),
    ("evaluate.py", "ckpt_pth=x", "ckpt_path"),
    ("predict.py", "inputt=x", "input"),
])
def test_a_misspelt_key_gets_its_close_matches_before_anything_runs(script, argument, suggestion):
    result = subprocess.run([sys.executable, str(ROOT / script), argument], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"did you mean {suggestion}" in result.stderr and "Traceback" not in result.stderr


def test_config_comments_are_read_by_a_yaml_parser(tmp_path):
    """A '#' inside a quoted value is no comment; nested keys get their dotted names."""
    from biasseg.cli import commented_keys

    config = tmp_path / "c.yaml"
    config.write_text('defaults:\n  - x: y\nname: "a # b"   # the real comment\nsection:        # a section\n'
                      '  inner: 3      # inner key\n  silent: 1\nurl: http://h/#frag\n')
    assert commented_keys(config) == [("name", "the real comment"), ("section", "a section"), ("section.inner", "inner key")]
