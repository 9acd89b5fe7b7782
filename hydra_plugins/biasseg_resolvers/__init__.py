"""Registers biasseg's config resolvers (:mod:`biasseg.resolvers`) when Hydra starts: Hydra
imports every module of the ``hydra_plugins`` namespace package before it composes a config,
with ``@hydra.main`` and with the compose API alike."""

import biasseg.resolvers  # noqa: F401  (registers on import)
