"""Keep a resumed checkpoint's callback state from pointing Lightning at files outside its folder.

``ModelCheckpoint`` stores the paths of the checkpoints it wrote (best k, last) and, after a
resume, deletes the ones a newer checkpoint supersedes, if they lie in its folder. A crafted
checkpoint can name ``<its folder>/../../anything`` (which lies "in" the folder until ``..`` is
resolved) or a remote URL; those entries are dropped before Lightning restores the state.
"""

from __future__ import annotations

import os
from pathlib import Path


def _inside(path: object, folder: Path) -> bool:
    """Whether ``path`` is a local file path inside ``folder`` once ``..`` is resolved."""
    if not isinstance(path, str) or not path or "://" in path:
        return False
    resolved = Path(os.path.normpath(os.path.abspath(path)))
    return folder in resolved.parents


PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


def confine_callback_state(checkpoint: dict) -> list[str]:
    """Drop the checkpoint files named by ``ModelCheckpoint`` states that lie outside that
    callback's own folder (Lightning deletes superseded "best" and "last" files it finds
    there); a state without a usable folder keeps none. Returns what was dropped; changes
    ``checkpoint`` in place."""
    dropped = []
    callbacks = checkpoint.get("callbacks")
    for state in (callbacks.values() if isinstance(callbacks, dict) else []):
        if not isinstance(state, dict) or not (set(state) & {*PATH_KEYS, "best_k_models"}):
            continue
        dirpath = state.get("dirpath")
        folder = Path(os.path.normpath(os.path.abspath(dirpath))) if isinstance(dirpath, str) and dirpath else None
        best = state.get("best_k_models")
        if isinstance(best, dict):
            for path in [p for p in best if folder is None or not _inside(p, folder)]:
                dropped.append(str(path))
                del best[path]
        elif best is not None:
            dropped.append(str(best)[:80])
            state["best_k_models"] = {}
        for key in PATH_KEYS:
            if state.get(key) and (folder is None or not _inside(state[key], folder)):
                dropped.append(str(state[key]))
                state[key] = ""
    return dropped
