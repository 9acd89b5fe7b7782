"""Training augmentation: the configured TorchIO transforms, composed in config order."""

from __future__ import annotations

from collections.abc import Mapping

import torchio as tio


def augmentation(transforms: Mapping[str, tio.Transform | None] | None) -> tio.Compose:
    """Compose the configured augmentations in config order; ``None`` entries are skipped."""
    return tio.Compose([t for t in (transforms or {}).values() if t is not None])
