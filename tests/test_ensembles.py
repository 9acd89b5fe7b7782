"""Deep ensembles and Hong et al.'s Tversky hypernetwork at inference: evaluate.py and
predict.py with several checkpoints (maps averaged, samples for the energy distance) and a
hypernetwork's α."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, compose_config
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from biasseg.errors import InputError
from biasseg.metrics.energy_distance import generalised_energy_distance
from biasseg.pipelines.evaluate import evaluate
from biasseg.pipelines.train import train
from lightning_modules.checkpoints import load_ensemble, read_checkpoints

QUIET = ["callbacks.validation_figures=null"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    """Two one-epoch runs of the tiny synthetic task, seeds 0 and 1: ``<dir>/seed<k>/``."""
    root = tmp_path_factory.mktemp("ensemble")
    for seed in (0, 1):
        train(compose_config([*TINY, *QUIET, f"seed={seed}"], root / f"seed{seed}"))
    return root


def evaluation_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("evaluate", overrides=["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", *overrides])
    cfg.paths.output_dir = str(tmp_path)
    return cfg


def test_an_ensembles_map_is_the_mean_of_its_members_maps(seeds):
    paths = [seeds / f"seed{k}" / "checkpoints" / "last.ckpt" for k in (0, 1)]
    ensemble = load_ensemble(read_checkpoints([str(p) for p in paths])).predictor
    members = [load_ensemble(read_checkpoints(str(p))).predictor for p in paths]
    image = torch.randn(1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    mean, samples = ensemble.predict_with_samples(image)
    expected = (members[0].predict_probabilities(image) + members[1].predict_probabilities(image)) / 2
    assert torch.allclose(mean, expected, atol=1e-6)
    assert samples.shape == (2, 32, 32, 16) and samples.dtype == torch.uint8
    for member, sample in zip(members, samples):
        assert torch.equal(sample, member.predict_probabilities(image).argmax(0).to(torch.uint8))
    single, none = members[0].predict_with_samples(image)
    assert none is None and torch.allclose(single, members[0].predict_probabilities(image))


def test_evaluate_takes_a_glob_of_checkpoints_and_reports_the_energy_distance(seeds, tmp_path):
    pattern = str(seeds / "seed*" / "checkpoints" / "last.ckpt")
    summary = evaluate(evaluation_config(tmp_path, f"ckpt_path={pattern}"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ckpt_path"] == [str(seeds / f"seed{k}" / "checkpoints" / "last.ckpt") for k in (0, 1)]
    assert metrics["epoch"] == [0, 0] and len(metrics["global_step"]) == 2
    with open(tmp_path / "subjects.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(0.0 <= float(r["ged"]) <= 2.0 for r in rows)
    assert summary["val/ged"] == pytest.approx(sum(float(r["ged"]) for r in rows) / 2)
    single = tmp_path / "single"
    evaluate(evaluation_config(single, f"ckpt_path={seeds / 'seed0' / 'checkpoints' / 'last.ckpt'}"))
    with open(single / "subjects.csv") as handle:
        assert "ged" not in next(csv.DictReader(handle))  # one network, one sample: no energy distance
    assert json.loads((single / "metrics.json").read_text())["ckpt_path"].endswith("seed0/checkpoints/last.ckpt")


def test_ensemble_members_that_do_not_fit_together_are_named(seeds, tmp_path):
    first = seeds / "seed0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(first, weights_only=True)
    checkpoint["hyper_parameters"]["class_names"] = ["tumour"]
    other = tmp_path / "other_classes.ckpt"
    torch.save(checkpoint, other)
    with pytest.raises(InputError, match=f"ckpt_path={other}: its classes \\['tumour'\\] differ from those of {first}"):
        load_ensemble(read_checkpoints([str(first), str(other)]))
    with pytest.raises(InputError, match="the pattern matches no file"):
        read_checkpoints(str(tmp_path / "nothing*" / "last.ckpt"))
    with pytest.raises(InputError, match="given twice"):
        read_checkpoints([str(first), str(first)])
    with pytest.raises(InputError, match="is not a Tversky hypernetwork"):
        load_ensemble(read_checkpoints(str(first)), alpha=0.3)


def test_energy_distance_by_hand():
    """Masks of 4 voxels: samples {0,1} and {1,2}, reference {1}: d(S1,Y) = d(S2,Y) = 1/2,
    d(S1,S2) = 2/3, so D² = 2 · 1/2 − (2 · 2/3) / 4 − 0 = 2/3."""
    samples = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]])
    reference = torch.tensor([[0, 1, 0, 0]])
    assert generalised_energy_distance(samples, reference, 2).tolist() == pytest.approx([2 / 3])
    # identical distributions (the same two samples as raters): 0; both empty everywhere: 0
    assert generalised_energy_distance(samples, samples, 2).tolist() == pytest.approx([0.0])
    assert generalised_energy_distance(torch.zeros(2, 4), torch.zeros(1, 4), 2).tolist() == [0.0]
    assert math.isnan(generalised_energy_distance(samples[:1], reference, 2).item())
    # per class: class 2 only in the second sample
    two = torch.tensor([[1, 0, 0, 0], [1, 2, 0, 0]])
    assert generalised_energy_distance(two, torch.tensor([[1, 0, 0, 0]]), 3).tolist() == pytest.approx([0.0, 0.5])


@pytest.mark.slow
def test_a_hypernetworks_alpha_trades_volume_at_inference(tmp_path):
    """Trained with Tversky(α FP, (1 − α) FN) at one α per batch, the network segments less as
    α grows; without alpha= its marginal map averages the inference α's (the samples of GED)."""
    overrides = [o for o in TINY if not o.startswith(("trainer.max_epochs", "data.samples_per_volume"))]
    cfg = compose_config([*overrides, *QUIET, "model=tversky_hypernet", "loss=tversky", "model.features=[4,8]",
                          "trainer.max_epochs=10", "data.samples_per_volume=8"], tmp_path / "run")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    subjects = list(datamodule.val_dataloader())
    volumes = []
    for alpha in (0.1, 0.5, 0.9):
        predictor = load_ensemble(read_checkpoints(str(ckpt)), alpha=alpha).predictor
        volumes.append(sum(float(predictor.predict_probabilities(s["image"]["data"])[1].sum()) for s in subjects))
    assert volumes[0] > volumes[1] > volumes[2], volumes
    marginal = load_ensemble(read_checkpoints(str(ckpt))).predictor
    alphas = marginal.first.hypernet["inference_alphas"]
    mean, samples = marginal.predict_with_samples(subjects[0]["image"]["data"])
    assert samples.shape[0] == len(alphas) == 9
    by_alpha = []
    for alpha in alphas:
        marginal.alpha = alpha
        by_alpha.append(marginal.predict_probabilities(subjects[0]["image"]["data"]))
    assert torch.allclose(mean, torch.stack(by_alpha).mean(0), atol=1e-6)
    summary = evaluate(evaluation_config(tmp_path / "at_alpha", f"ckpt_path={ckpt}", "alpha=0.9"))
    assert json.loads((tmp_path / "at_alpha" / "metrics.json").read_text())["alpha"] == 0.9
    assert "val/ged" not in summary  # one α, one sample


def test_evaluations_are_summarised_over_seeds_with_ratios_of_sums(tmp_path, capsys):
    """scripts/summarise_evaluations.py on two hand-made seed folders: mean ± sd over seeds of
    metrics.json values, of ratios of sums and of per-subject means (hand-computed)."""
    from scripts.summarise_evaluations import main as summarise

    subjects = {  # seed -> [(soft ml, argmax ml, expected ml)] for subjects a, b
        0: [(1.2, 0.9, 1.0), (3.6, 2.7, 3.0)],  # soft 4.8 / 4 - 1 = +20 %, per subject +20, +20; argmax -10 %
        1: [(0.8, 1.0, 1.0), (3.6, 3.0, 3.0)],  # soft 4.4 / 4 - 1 = +10 %, per subject -20, +20; argmax 0 %
    }
    for seed, rows in subjects.items():
        folder = tmp_path / "multi_rater" / "tversky" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"val/dice": 0.5 + 0.1 * seed, "val/ged": 0.3}))
        with open(folder / "subjects.csv", "w") as handle:
            handle.write("subject,dice,volume_ref_ml,volume_pred_ml,volume_pred_soft_ml,volume_expected_ml\n")
            for name, (soft, hard, expected) in zip("ab", rows):
                handle.write(f"{name},0.5,{expected},{hard},{soft},{expected}\n")
    assert summarise([str(tmp_path)]) == 0
    header, _, row = capsys.readouterr().out.strip().splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["evaluation"] == "multi_rater/tversky" and cells["n"] == "2"
    assert cells["Dice"] == "0.55 ± 0.071"  # sd of 0.5, 0.6
    assert cells["soft vs expected, ratio of sums"] == "+15.0 ± 7.1 %"  # +20, +10
    assert cells["argmax vs expected, ratio of sums"] == "-5.0 ± 7.1 %"  # -10, 0
    assert cells["soft vs expected, mean of ratios"] == "+10.0 ± 14.1 %"  # +20, 0
    assert cells["GED"] == "0.3 ± 0" and cells["mean Dice vs each rater"] == ""  # no raters' columns
