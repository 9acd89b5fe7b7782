"""Predict each loss's volume bias from theory: the optimum of its expected value under label
uncertainty, for one sphere, swept over the uncertainty σ and the structure radius.

    python theory.py                                   # both kinds, σ 0–3 mm, radii 4/8/16 mm
    python theory.py kinds=[voxel] losses=[ce,softdice] sigmas_mm=[0,1,2]

Writes ``theory.csv`` (one row per kind × radius × σ × loss: volumes in ml, relative biases),
``volume_bias.png`` (bias against σ) and ``volume_bias_vs_radius.png`` (bias against the
radius at ``radius_sweep.sigma_mm``) into ``logs/theory/runs/<timestamp>/``.
Configuration: configs/theory.yaml.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.progress import track

from biasseg.cli import CONFIGS
from biasseg.run_files import csv_text, write_atomically
from biasseg.theory import bias_curve
from biasseg.theory.plots import bias_figure


def grid(settings: dict) -> list[tuple[str, float, float]]:
    """``(kind, radius, σ)`` points of both sweeps, each once, in order."""
    points = [(r, s) for r in settings["radii_mm"] for s in settings["sigmas_mm"]]
    points += [(r, settings["radius_sweep"]["sigma_mm"]) for r in settings["radius_sweep"]["radii_mm"]]
    unique = dict.fromkeys((float(r), float(s)) for r, s in points)
    return [(kind, r, s) for kind in settings["kinds"] for r, s in unique]


def run(settings: dict) -> list[dict]:
    """All rows of the grid, with a progress bar."""
    rows = []
    for kind, radius, sigma in track(grid(settings), description="expected-loss optima"):
        rows += bias_curve(
            kind, [sigma], radius, settings["spacing_mm"], settings["losses"], batch_size=settings["batch_size"],
            field_of_view_mm=settings["field_of_view_mm"], num_draws=settings["num_draws"], bins=settings["bins"],
            seed=settings["seed"],
        )
    return rows


def save_figure(figure, path: Path) -> None:
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=120, bbox_inches="tight"))


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="theory")
def main(cfg: DictConfig) -> None:
    settings = OmegaConf.to_container(cfg, resolve=True)
    rows = run(settings)
    out = Path(settings["paths"]["output_dir"])
    write_atomically(out / "theory.csv", csv_text(rows))
    radii, sigmas, sweep = settings["radii_mm"], settings["sigmas_mm"], settings["radius_sweep"]
    sweeps = {  # figure: (x axis, its (radius, σ) points)
        "volume_bias.png": ("sigma_mm", {(float(r), float(s)) for r in radii for s in sigmas}),
        "volume_bias_vs_radius.png": ("radius_mm", {(float(r), float(sweep["sigma_mm"])) for r in sweep["radii_mm"]}),
    }
    for name, (x, points) in sweeps.items():
        save_figure(bias_figure([r for r in rows if (r["radius_mm"], r["sigma_mm"]) in points], x), out / name)
    print(f"Wrote {out / 'theory.csv'}, {out / 'volume_bias.png'} and {out / 'volume_bias_vs_radius.png'}")


def cli() -> None:
    """``python theory.py …`` and the console script ``biasseg-theory``."""
    main()
