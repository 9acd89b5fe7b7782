"""Pictures and loggers: PNG figures, TensorBoard images, an offline wandb run."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, compose_config
from train import train


def test_figures_are_written_and_sent_to_tensorboard(tmp_path):
    train(compose_config(TINY + ["logger=many", "trainer.max_epochs=2", "callbacks.validation_figures.every_n_epochs=1"],
                         tmp_path))
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert names == ["reliability_epoch000.png", "reliability_epoch001.png", "slices_epoch000.png",
                     "slices_epoch001.png", "volumes_epoch000.png", "volumes_epoch001.png"]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"val/slices", "val/volumes", "val/reliability"} <= set(events.Tags()["images"])
    assert {"val/dice", "val/ece"} <= set(events.Tags()["scalars"])


def test_offline_wandb_run_holds_metrics_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(compose_config(TINY + ["logger=wandb"], tmp_path))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the offline run's record log (protobuf) holds the logged keys verbatim
    records = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"val/dice", b"val/volume_bias_ml", b"val/relative_soft_expected_volume_bias"):
        assert key in records, key
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png"))
