"""The configs' own OmegaConf resolvers, registered wherever the configs are composed.

``train.py`` and the other entry points import this module; Hydra's compose API (tests, a
notebook, the lightning-hydra-template's way) imports it through the ``hydra_plugins``
package :mod:`hydra_plugins.biasseg`, because Hydra imports every module there
before it composes anything. So every config group composes and instantiates outside a Hydra
run too.
"""

from __future__ import annotations

import time

from omegaconf import OmegaConf


def run_output_dir(outside_a_run: str) -> str:
    """This Hydra run's output directory (``hydra.runtime.output_dir``); outside a Hydra run
    (compose API) ``<outside_a_run>/<timestamp>``, the same within one process."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.output_dir)
    return f"{outside_a_run}/{time.strftime('%Y-%m-%d_%H-%M-%S', time.localtime(_STARTED))}"


def gpus_per_node(accelerator: object, devices: object) -> object:
    """The SLURM launcher's GPUs per node: ``trainer.devices``, 0 on the CPU."""
    return 0 if str(accelerator) == "cpu" else devices


_STARTED = time.time()  # the timestamp of a composed (not Hydra-run) output directory

OmegaConf.register_new_resolver("run_output_dir", run_output_dir, replace=True)
OmegaConf.register_new_resolver("gpus_per_node", gpus_per_node, replace=True)
