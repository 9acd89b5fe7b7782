"""The configs work outside train.py: composed with Hydra's compose API, as the
lightning-hydra-template's tests and a notebook do, every data, model and loss option
instantiates, with no Hydra run (no ``HydraConfig``) and nothing registered by hand first."""

import json
import subprocess
import sys

import pytest
from helpers import CONFIG_DIR, ROOT

from biasseg.generated_folders import write_msd

# A fresh interpreter that imports nothing of biasseg before composing: the resolvers the
# configs use must come with Hydra's start (hydra_plugins/biasseg_resolvers).
SCRIPT = """
import json, sys
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
config_dir, dataset, groups = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
built = {}
with initialize_config_dir(version_base="1.3", config_dir=config_dir):
    for group, options in groups.items():
        for option in options:
            extra = {"folder": [f"data.root={dataset}", f"data.cache_dir={dataset}_cache"],
                     "tversky_hypernet": ["loss=tversky"]}.get(option, [])
            cfg = compose("train", overrides=[f"{group}={option}", *extra])
            built[f"{group}={option}"] = type(instantiate(cfg[group])).__name__
    built["output_dir"] = compose("train").paths.output_dir
print(json.dumps(built))
"""


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.slow
def test_every_data_model_and_loss_option_instantiates_from_the_compose_api(tmp_path):
    dataset = write_msd(tmp_path / "dataset", channels=1)
    groups = {"data": options("data"), "model": options("model"), "loss": options("loss")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(CONFIG_DIR), str(dataset), json.dumps(groups)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k for k in built if k != "output_dir"} == {f"{g}={o}" for g, opts in groups.items() for o in opts}
    assert all(built[f"data={o}"].endswith("DataModule") for o in groups["data"])
    assert all(built[f"model={o}"] == "SegmentationModule" for o in groups["model"])
    assert all(built[f"loss={o}"].endswith("Loss") for o in groups["loss"])
    # outside a Hydra run, outputs go under logs/<task>/composed/<timestamp> (a Hydra run: its run directory)
    assert built["output_dir"].startswith("logs/train/composed/")


@pytest.mark.slow
def test_lightnings_srun_hint_is_silenced_outside_a_slurm_job_only(tmp_path):
    """Lightning hints to prepend ``srun`` at every Trainer wherever srun is installed; it is
    noise outside a SLURM job and kept inside one."""
    srun = tmp_path / "bin" / "srun"  # what Lightning looks for: an srun on the PATH (a stand-in where SLURM is not installed)
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    script = "import lightning_modules, pytorch_lightning as pl; pl.Trainer(accelerator='cpu', logger=False)"
    base = {"PATH": f"{srun.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    outside = subprocess.run([sys.executable, "-c", script], env=base, capture_output=True, text=True, timeout=120)
    inside = subprocess.run([sys.executable, "-c", script], env={**base, "SLURM_JOB_ID": "7"}, capture_output=True,
                            text=True, timeout=120)
    assert outside.returncode == 0 and inside.returncode == 0, outside.stderr[-2000:] + inside.stderr[-2000:]
    hint = "The `srun` command is available on your system but is not used"
    assert hint not in outside.stderr + outside.stdout
    assert hint in inside.stderr + inside.stdout
