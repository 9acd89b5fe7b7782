"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher, which checks each
request against its partition before submitting (:mod:`biasseg.slurm.request`) and says what
the jobs do while the sweep waits (:mod:`biasseg.slurm.watch`). Submission, requeue on
timeout and preemption, and the jobs themselves are submitit's, unchanged."""

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class CheckedSlurmQueueConf(SlurmQueueConf):
    """submitit_slurm's keys and three of biasseg's (documented in configs/hydra/launcher/slurm.yaml)."""

    _target_: str = "hydra_plugins.biasseg.slurm_launcher.CheckedSlurmLauncher"
    check_request: bool = True
    poll_s: float = 10.0
    report_every_s: float = 60.0


ConfigStore.instance().store(group="hydra/launcher", name="checked_slurm", node=CheckedSlurmQueueConf(), provider="biasseg")


class CheckedSlurmLauncher(SlurmLauncher):
    def __init__(self, check_request: bool = True, poll_s: float = 10.0, report_every_s: float = 60.0, **params: Any) -> None:
        super().__init__(**params)
        self.check_request, self.poll_s, self.report_every_s = check_request, float(poll_s), float(report_every_s)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from biasseg.slurm.request import CannotQuery, request_problem
        from biasseg.slurm.watch import FAILED_STATES, watch

        assert self.config is not None and job_overrides
        if self.check_request:
            try:
                problem = request_problem(self.params)
            except CannotQuery as why:
                log.warning(f"cannot check the request against the partition ({why}); submitting it unchecked")
                problem = None
            if problem:
                print(f"error: {problem}", file=sys.stderr, flush=True)
                raise SystemExit(1)  # Hydra would print a traceback for an exception; the line says it all
        # from here as hydra-submitit-launcher 1.2's BaseSubmititLauncher.launch, which then blocks
        # on the results without a word
        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        job_params, numbers = [], []
        for offset, overrides in enumerate(job_overrides):
            number = initial_job_idx + offset
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state()))
            numbers.append(number)
        jobs = executor.map_array(self, *zip(*job_params))
        watched = watch(jobs, [sweep_dir / str(n) for n in numbers], self.poll_s, self.report_every_s)  # subdir: the job number
        failed = [item.job.job_id for item in watched if item.state in FAILED_STATES]
        if failed:  # each one's log tail is printed above; submitit's exception would only repeat it
            print(f"error: {len(failed)} of {len(watched)} job(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
            raise SystemExit(1)
        return [job.results()[0] for job in jobs]
