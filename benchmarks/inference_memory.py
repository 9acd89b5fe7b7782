"""Peak memory of whole-volume inference at CT size: our ``SlidingWindow`` against MONAI's.

What: one volume of ``--volume`` voxels (default 512×512×300, a CT) with ``--classes`` classes
(default 3) through the same ``UNet3D`` by

* ours: ``lightning_modules.SlidingWindow`` with ``accumulate`` ``auto`` (the device unless it
  cannot hold the map, see :mod:`lightning_modules.sliding_window`), and on a GPU also
  ``cpu`` (the fallback, forced);
* peer: ``monai.inferers.sliding_window_inference`` with the same patch, overlap, batch and
  blending window (ours, as ``roi_weight_map``), its output on the device (``device`` = the
  input's) and, on a GPU, also on the CPU (``device="cpu"``: MONAI's own fallback).

Each variant runs alone in a fresh process, so its peak is its own: the peak resident set
(``ru_maxrss``, CPU memory of the whole process, the model and the input included) and on a
GPU ``torch.cuda.max_memory_allocated``. Every variant's map is checked equal to the first
one's to 1e-5 (same windows and grids, so the same sums), over the whole volume.

Result (last line): ``{"name": "inference_memory", "ours": <peak GiB>, "peer": <peak GiB>,
"unit": "GiB peak", "ratio": peer/ours}`` -- the peak that limits the run: device memory on a
GPU (ours ``auto`` vs MONAI on the device), the resident set on the CPU.

    python benchmarks/inference_memory.py --quick                 # 160×160×96, seconds
    python benchmarks/inference_memory.py --device cpu            # CT size on the CPU (minutes on 2 cores)
    python benchmarks/inference_memory.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

VARIANTS_CPU = ("ours_auto", "monai")
VARIANTS_GPU = ("ours_auto", "ours_cpu", "monai", "monai_cpu")


def child(args) -> None:
    """Run one variant; write its map's path and peaks as JSON on stdout's last line."""
    from lightning_modules import SlidingWindow, UNet3D

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    net = UNet3D(1, args.classes, args.features).to(device).eval()
    image = torch.randn(1, *args.volume, generator=torch.Generator().manual_seed(args.seed)).to(device)
    window = SlidingWindow(args.patch, overlap=0.5, batch_size=args.batch, weighting="gaussian",
                           accumulate="cpu" if args.variant == "ours_cpu" else "auto")

    def predict(patches: torch.Tensor) -> torch.Tensor:
        with common.autocast(device, args.precision):
            return net(patches)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.inference_mode():
        if args.variant.startswith("ours"):
            probabilities = window(image, predict)
        else:
            from monai.inferers import sliding_window_inference

            from lightning_modules.sliding_window import blending_window

            weights = blending_window(args.patch, "gaussian", device)
            probabilities = sliding_window_inference(
                image[None], args.patch, args.batch, lambda x: torch.softmax(predict(x).float(), 1), overlap=0.5,
                roi_weight_map=weights, device=torch.device("cpu") if args.variant == "monai_cpu" else device,
                sw_device=device, progress=False)[0]
    common.sync(device)
    seconds = time.perf_counter() - start
    peak_device = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    torch.save(probabilities.cpu(), args.out)
    print(json.dumps({"variant": args.variant, "seconds": seconds, "map_device": str(probabilities.device),
                      "rss_gib": common.gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
                      "device_gib": None if peak_device is None else common.gib(peak_device)}))


def main() -> None:
    parser = common.base_parser(__doc__)
    common.add_network_arguments(parser)
    parser.add_argument("--volume", type=common.triple, default=None, help="default 512,512,300; quick 160,160,96")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: one variant in this process
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = common.select_device(args.device, args.quick)
    args.device = device.type
    args.classes = args.classes if args.classes != 2 else 3  # a CT's organs: 3 classes unless asked otherwise
    args.volume = args.volume or ((160, 160, 96) if args.quick else (512, 512, 300))
    args.patch = args.patch or ((64, 64, 64) if args.quick or device.type == "cpu" else (128, 128, 128))
    args.features = args.features or common.ints("4,8,16" if args.quick or device.type == "cpu" else common.NNUNET_FEATURES)
    if args.variant is not None:
        child(args)
        return
    print(common.describe_environment(device, args.precision))
    print(f"volume {args.volume} | classes {args.classes} | patch {args.patch} | batch {args.batch} | features {args.features}")
    rows, maps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS_GPU if device.type == "cuda" else VARIANTS_CPU:
            out = Path(tmp) / f"{variant}.pt"
            command = [sys.executable, __file__, "--variant", variant, "--out", str(out), "--device", device.type,
                       "--precision", args.precision, "--seed", str(args.seed), "--batch", str(args.batch),
                       "--classes", str(args.classes), "--volume", ",".join(map(str, args.volume)),
                       "--patch", ",".join(map(str, args.patch)), "--features", ",".join(map(str, args.features))]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            current = torch.load(out, weights_only=True)
            if maps:
                difference = float((current - maps[0]).abs().max())
                rows[-1]["max_diff"] = difference
                tolerance = 1e-5 if args.precision == "32" else 1e-3
                assert difference <= tolerance, f"{variant}'s map differs from {rows[0]['variant']}'s by {difference}"
            maps = maps or [current]
    common.print_table(["variant", "s/volume", "map on", "peak RSS GiB", "peak device GiB", "max |Δp|"],
                       [[r["variant"], r["seconds"], r["map_device"], r["rss_gib"], r["device_gib"], r.get("max_diff")]
                        for r in rows])
    by_name = {r["variant"]: r for r in rows}
    key = "device_gib" if device.type == "cuda" else "rss_gib"
    ours, peer = by_name["ours_auto"][key], by_name["monai"][key]
    common.emit("inference_memory", ours, peer, "GiB peak", peer / ours)


if __name__ == "__main__":
    main()
