"""The cluster path's own parts: the pre-submit check of a SLURM request against its partition
(:mod:`~biasseg.slurm.request`) and the job states said while a sweep waits
(:mod:`~biasseg.slurm.watch`), both used by ``hydra/launcher=slurm``
(:mod:`hydra_plugins.biasseg.slurm_launcher`)."""
