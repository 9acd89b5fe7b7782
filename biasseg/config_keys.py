"""Dotted keys of nested configs (``trainer.max_epochs``), the one walker that the resume
check, the command-line key check and the report's grouping share; and which data keys say how
a run executes rather than what it computes.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

EXECUTION_DATA_KEYS = ("num_workers", "pin_memory", "val_batch_size", "val_accumulate")  # data.<key>: how, not what, is computed


def flatten(node: object, prefix: str = "") -> dict[str, object]:
    """``{"a.b": value}`` of nested mappings (dicts or DictConfigs, read without resolving);
    lists and empty mappings are values. A ``node`` that is no mapping is ``{prefix: node}``."""
    if not isinstance(node, (Mapping, DictConfig)) or not node:
        return {prefix.rstrip("."): node}
    flat: dict[str, object] = {}
    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
    for key, value in items:
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def all_keys(node: object) -> list[str]:
    """Every dotted key of a config, its sections included (list items are not keys)."""
    keys = dict.fromkeys(prefix for key in flatten(node) if key
                         for prefix in (".".join(key.split(".")[: i + 1]) for i in range(key.count(".") + 1)))
    return list(keys)


def differing_keys(a: Mapping, b: Mapping) -> list[str]:
    """Dotted keys whose values differ between two nested configs (a key one lacks differs)."""
    left, right = flatten(a), flatten(b)
    return sorted(key for key in set(left) | set(right) if left.get(key) != right.get(key))
