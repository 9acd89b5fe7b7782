"""Shared helpers of the benchmark scripts: device/precision selection, timing, medians, output.

Every benchmark prints a short table and, as its last line, exactly one JSON object
``{"name", "ours", "peer", "unit", "ratio"}`` with ``ratio > 1`` meaning we are better
(throughput: ours / peer; times: peer / ours).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its entry-point scripts and configs


def base_parser(description: str | None) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: --quick, --device, --precision, --seed."""
    parser = argparse.ArgumentParser(
        description=(description or "").strip().splitlines()[0] if description else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (<= 2 min on 2 cores)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cpu with --quick, else cuda if available"
    )
    parser.add_argument("--precision", choices=["32", "bf16"], default="32", help="bf16 = torch.autocast(bfloat16)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


NNUNET_FEATURES = "32,64,128,256,320,320"


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """--features, --patch, --batch, --classes: the network and input sizes (None = per mode)."""
    parser.add_argument(
        "--features", type=ints, default=None, help=f"default {NNUNET_FEATURES}; quick 8,16,32,64"
    )
    parser.add_argument("--patch", type=triple, default=None, help="default 128; quick 32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=2)


def select_device(name: str | None, quick: bool) -> torch.device:
    if name is None:
        name = "cpu" if quick or not torch.cuda.is_available() else "cuda"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """``torch.autocast(device, bfloat16)`` for ``bf16``, a no-op for ``32``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def spread(values: Sequence[float]) -> str:
    """``min..max`` of the repetitions, to show the noise next to the median."""
    return f"{min(values):.4g}..{max(values):.4g}" if values else "-"


def ints(text: str) -> list[int]:
    """``"32,64,128"`` → ``[32, 64, 128]`` (also accepts ``x`` as separator, e.g. ``128x128x128``)."""
    return [int(t) for t in text.replace("x", ",").split(",") if t.strip()]


def triple(text: str) -> tuple[int, int, int]:
    values = ints(text)
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected 1 or 3 sizes, got {text!r}")
    return tuple(values)  # type: ignore[return-value]


def describe_environment(device: torch.device, precision: str) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus"
    return f"torch {torch.__version__} | device {device} ({name}) | precision {precision}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def result_json(name: str, ours: float | None, peer: float | None, unit: str, ratio: float | None) -> str:
    def clean(x):
        if x is None or (isinstance(x, float) and not math.isfinite(x)):
            return None
        return round(float(x), 6)

    return json.dumps({"name": name, "ours": clean(ours), "peer": clean(peer), "unit": unit, "ratio": clean(ratio)})


def emit(name: str, ours: float | None, peer: float | None, unit: str, ratio: float | None) -> None:
    """Print the result line (call it last)."""
    print(result_json(name, ours, peer, unit, ratio), flush=True)


def emit_ratio(name: str, ours: float, peer: float, unit: str, target: float, higher_is_better: bool) -> None:
    """Print the ratio (better when > 1) against its target, then the result line."""
    ratio = ours / peer if higher_is_better else peer / ours
    print(f"ratio {'ours/peer' if higher_is_better else 'peer/ours'} = {ratio:.3f} (target >= {target})")
    emit(name, ours, peer, unit, ratio)


def gib(n_bytes: float) -> float:
    return float(n_bytes) / 2**30
