"""Write what ``benchmarks/gpu.sh`` measured as one dated Markdown section, ``OUT/gpu_results.md``.

    python benchmarks/record_gpu.py OUT [--mode gpu|cpu]

Reads ``OUT/device.txt``, ``OUT/steps.tsv`` (each step: passed or failed, wall seconds),
``OUT/bench_results.jsonl`` (each benchmark's result line), ``train_step.log`` (MFU), the
``metrics.json`` of ``OUT/train``, ``OUT/evaluate_bf16`` and ``OUT/evaluate_fp32`` and
``OUT/predictions/volumes.csv``. Whatever is missing shows as "—"; the section says which
steps failed. Exits 1 when a benchmark measured no number (``ours`` or ``peer`` null; syncs
only exist on a GPU), so that the CPU rehearsal catches a benchmark that stopped measuring.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import re
from pathlib import Path

# Issue 22's goals on a GPU, as result-line ratios (ratio > 1: ours better; see common.py)
GOALS = {
    "train_step": (1.1, "≥ 1.1× nnU-Net's PlainConvUNet steps/s, equal precision"),
    "inference": (1.5, "≥ 1.5× MONAI's sliding_window_inference (s/volume), equal output"),
    "inference_memory": (1.0, "peak memory ≤ MONAI's on a 512×512×300 CT, 3 classes"),
    "overhead_fraction": (1.0, "loss + logging ≤ 2 % of a training step"),
    "overhead_syncs": (1.0, "0 host-device syncs per step"),
    "training": (None, "real data pipeline vs one in-memory batch (it/s; 1.0 = data loading costs nothing)"),
    "pipeline": (1.0, "patches/s of our loader vs TorchIO's Queue"),
}
EVALUATION_KEYS = (("val/dice", "Dice", "{:.4f}"), ("val/soft_relative_volume_bias", "soft volume vs reference", "{:+.2%}"),
                   ("val/ece", "ECE", "{:.4f}"))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def formatted(value: object, pattern: str = "{:.4g}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return pattern.format(value) if isinstance(value, (int, float)) else str(value)


def section(out: Path, mode: str) -> str:
    device = (out / "device.txt").read_text().strip().splitlines()[-1] if (out / "device.txt").is_file() else "unknown"
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()] if (out / "steps.tsv").is_file() else []
    failed = [name for name, status, _ in steps if status != "passed"]
    seconds = {name: int(s) for name, _, s in steps}
    results = {}
    if (out / "bench_results.jsonl").is_file():
        for line in (out / "bench_results.jsonl").read_text().splitlines():
            row = json.loads(line)
            results[row["name"]] = row
    title = "GPU run" if mode == "gpu" else "CPU rehearsal of the GPU run"
    lines = [f"## {title} (`bash benchmarks/gpu.sh{' --cpu' if mode == 'cpu' else ''}`), {datetime.date.today()}, {device}", ""]
    lines += ["Failed steps: " + ", ".join(failed) + " (their logs are in the run's OUT folder)." if failed else
              "Every step passed.", ""]
    train = read_json(out / "train" / "metrics.json")
    lines += [f"train.py ({seconds.get('train', '—')} s wall, {formatted(train.get('epoch'), '{:d}')} as last epoch): "
              f"val/dice {formatted(train.get('val/dice'), '{:.4f}')}. predict.py: "
              f"{count_rows(out / 'predictions' / 'volumes.csv')} case(s) written in {seconds.get('predict', '—')} s.", ""]
    bf16, fp32 = read_json(out / "evaluate_bf16" / "metrics.json"), read_json(out / "evaluate_fp32" / "metrics.json")
    lines += ["evaluate.py on the same checkpoint, bf16-mixed against 32-true:", "",
              "| measure | bf16-mixed | 32-true | difference |", "| --- | --- | --- | --- |"]
    for key, name, pattern in EVALUATION_KEYS:
        a, b = bf16.get(key), fp32.get(key)
        difference = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        lines.append(f"| {name} | {formatted(a, pattern)} | {formatted(b, pattern)} | {formatted(difference, '{:+.2g}')} |")
    lines += ["", "| benchmark | ours | peer | unit | ratio (> 1: ours better) | goal | met |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, (goal, what) in GOALS.items():
        row = results.get(name, {})
        ratio = row.get("ratio")
        met = "—" if goal is None or ratio is None else ("yes" if ratio >= goal else "**no**")
        lines.append(f"| {name} | {formatted(row.get('ours'))} | {formatted(row.get('peer'))} | {row.get('unit', '—')} | "
                     f"{formatted(ratio, '{:.3f}')} | {what} | {met} |")
    mfu = re.search(r"^MFU: .*$", read_text(out / "train_step.log"), re.MULTILINE)
    lines += ["", mfu.group(0) if mfu else "MFU: —", ""]
    return "\n".join(lines)


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def count_rows(path: Path) -> str:
    try:
        with path.open(newline="") as handle:
            return str(sum(1 for _ in csv.DictReader(handle)))
    except OSError:
        return "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", choices=["gpu", "cpu"], default="gpu")
    args = parser.parse_args()
    text = section(args.out, args.mode)
    (args.out / "gpu_results.md").write_text(text + "\n")
    print(text)
    missing = unmeasured(args.out, args.mode)
    if missing:
        raise SystemExit(f"no number measured by: {', '.join(missing)}")


def unmeasured(out: Path, mode: str) -> list[str]:
    """The benchmarks of :data:`GOALS` that ran (their log exists) but whose result line is
    missing or holds a null."""
    rows = {}
    for line in read_text(out / "bench_results.jsonl").splitlines():
        row = json.loads(line)
        rows[row["name"]] = row
    expected = [name for name in GOALS if not (name == "overhead_syncs" and mode == "cpu")
                and (out / f"{name.split('_')[0] if name.startswith('overhead') else name}.log").is_file()]
    return [name for name in expected if rows.get(name, {}).get("ours") is None or rows.get(name, {}).get("peer") is None]


if __name__ == "__main__":
    main()
