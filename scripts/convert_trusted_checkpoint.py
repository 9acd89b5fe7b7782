"""Rewrite a checkpoint YOU TRUST so that biasseg can open it safely.

    python scripts/convert_trusted_checkpoint.py IN.ckpt OUT.ckpt

biasseg opens checkpoints with ``torch.load(weights_only=True)``: tensors and plain data
only, because unpickling anything else can run code. A checkpoint that holds other objects
(numpy arrays or scalars, OmegaConf nodes, paths, Lightning's AttributeDict — e.g. written by
an older or modified version) is refused with a message pointing here. This script loads IN
*with* full unpickling — which runs whatever code IN carries, so only use it on files from a
source you trust — turns those objects into plain lists, numbers, strings and dicts, and
writes OUT, which then loads with ``weights_only=True`` (checked before the script ends).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf


def plain(value):
    """``value`` with every container and scalar turned into what ``weights_only`` accepts."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return plain(OmegaConf.to_container(value, resolve=True))
    if isinstance(value, Mapping):
        return {plain(k) if not isinstance(k, str) else k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the checkpoint you trust")
    parser.add_argument("target", type=Path, help="where to write the converted checkpoint (must not exist)")
    args = parser.parse_args(argv)
    if args.target.exists():
        print(f"error: {args.target} exists; choose a new file", file=sys.stderr)
        return 1
    checkpoint = torch.load(args.source, map_location="cpu", weights_only=False)  # trusted by the user
    torch.save(plain(checkpoint), args.target)
    torch.load(args.target, map_location="cpu", weights_only=True)
    print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
