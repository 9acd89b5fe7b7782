"""Class paths written before biasseg became one package (the configs of finished runs,
checkpoints): ``losses.X``, ``callbacks.X``, ``loggers.X`` and ``metrics.X`` are now
``biasseg.losses.X`` and so on. Such files stay readable: every ``_target_`` read from one goes
through :func:`current_targets` before anything compares or builds it. The same goes for a
class replaced by an equivalent one: torch's ``PolynomialLR`` (the poly schedule of runs before
the package change) is the closed form of ``lightning_modules.poly_schedule.poly_lr``, with the
same arguments.
"""

from __future__ import annotations

from collections.abc import Mapping

MOVED_PACKAGES = ("callbacks", "loggers", "losses", "metrics")
REPLACED = {"torch.optim.lr_scheduler.PolynomialLR": "lightning_modules.poly_schedule.poly_lr"}


def current_target(target: object) -> object:
    """``"losses.SoftDiceLoss"`` → ``"biasseg.losses.SoftDiceLoss"``, a :data:`REPLACED` class →
    its replacement; anything else as it is."""
    if isinstance(target, str) and target.split(".", 1)[0] in MOVED_PACKAGES:
        return f"biasseg.{target}"
    return REPLACED.get(target, target) if isinstance(target, str) else target


def current_targets(node: object) -> object:
    """``node`` (plain dicts and lists, as a config reads) with every ``_target_`` made current."""
    if isinstance(node, Mapping):
        return {key: current_target(value) if key == "_target_" else current_targets(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [current_targets(value) for value in node]
    return node
