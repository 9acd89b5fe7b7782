"""biasseg's Hydra plugins. Hydra imports every module of the ``hydra_plugins`` namespace
package before it composes a config (with ``@hydra.main`` and with the compose API alike), so
importing this package registers the configs' resolvers (:mod:`biasseg.resolvers`) and
``hydra/launcher=slurm``'s checked launcher (:mod:`hydra_plugins.biasseg.slurm_launcher`)."""

import biasseg.resolvers  # noqa: F401  (registers on import)
