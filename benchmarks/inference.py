"""Whole-volume sliding-window inference: our ``SlidingWindow`` against MONAI's.

What: the time to turn one volume ``(channels, W, H, D)`` already on the device into blended
class probabilities ``(classes, W, H, D)`` with the same ``UNet3D`` (same weights, eval mode,
``torch.inference_mode``, same precision) by

* ours: ``lightning_modules.SlidingWindow(patch, overlap, batch, weighting)`` (TorchIO's
  grid, softmax per patch, blended on the device), and
* peer: ``monai.inferers.sliding_window_inference`` with the same ``roi_size``, ``overlap``,
  ``sw_batch_size`` and a predictor that returns ``softmax(net(x))`` -- MONAI blends whatever
  the predictor returns, so both compute a blended probability map. Weighting: ours
  ``gaussian`` vs MONAI ``mode="gaussian", sigma_scale=0.125`` (both σ = patch/8),
  ``constant`` vs ``constant``; ours ``hann`` has no MONAI mode, so MONAI gets our Hann window
  as ``roi_weight_map``.

Agreement, checked before timing:

* grids: our patch origins (``grid_locations``, TorchIO's grid, with the overlap
  rounded down to even voxels) vs MONAI's (``dense_patch_slices`` with interval
  ``int(patch·(1 − overlap))``) -- printed as identical or not;
* ``max |Δp| same weights``: MONAI given our blending window as ``roi_weight_map``. With
  identical grids the two compute the same sums in the same order, so this must be ~0;
  asserted ``<= 1e-5`` (float32) / ``1e-3`` (bf16, allowing non-bitwise convolution
  kernels between calls). With different grids it is only reported;
* ``max |Δp| native``: MONAI's own window. ``constant`` weights are identical in both, so
  with identical grids this is ~0 too. MONAI's Gaussian differs from ours by design: both
  use σ = patch/8, but MONAI clamps the 3D *product* at 1e-3 (and leaves even-sized windows
  at a peak slightly below 1, which cancels in the ratio), while ours normalises and clamps
  each 1D factor at 1e-3, so its product falls to 1e-9 in the corners. The product is below
  1e-3 on ~58 % of a cube patch (everything outside a ball of radius ~3.7σ), and there MONAI's
  weights are flat while ours keep falling, so wherever overlapping patches disagree the
  blends differ: with a randomly initialised net (patches disagree a lot) the quick run
  gives mean |Δp| ≈ 0.006 and max ≈ 0.2; a trained net's patches agree more. This is a
  difference of definitions, not an error, so it is only reported (with the share of voxels
  differing by > 1e-3) and asserted ``<= 0.5`` as a sanity bound.

How: one untimed volume per method, then ``--rounds`` timed volumes alternating the order
(A B, B A, ...), the device synchronised around each; median seconds per volume.

Result (last line): ``{"name": "inference", "ours": <s/volume>, "peer": <s/volume>,
"unit": "s/volume", "ratio": peer/ours}``; target ratio >= 1.0.

    python benchmarks/inference.py --quick
    python benchmarks/inference.py --device cuda --precision bf16      # nnU-Net size
"""

from __future__ import annotations

import common
import torch


def our_grid(shape, patch, overlap) -> list[tuple[int, ...]]:
    from lightning_modules.sliding_window import grid_locations, grid_overlap

    padded = tuple(max(s, p) for s, p in zip(shape, patch))
    locations = grid_locations(padded, tuple(patch), grid_overlap(patch, overlap))
    return sorted(tuple(int(v) for v in loc[:3]) for loc in locations)


def monai_grid(shape, patch, overlap) -> list[tuple[int, ...]]:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    padded = tuple(max(s, p) for s, p in zip(shape, patch))
    interval = _get_scan_interval(padded, tuple(patch), 3, (overlap,) * 3)
    slices = dense_patch_slices(padded, tuple(patch), interval)
    return sorted(tuple(int(s.start) for s in sl) for sl in slices)


def axis_starts(grid: list[tuple[int, ...]]) -> list[list[int]]:
    return [sorted({g[a] for g in grid}) for a in range(3)]


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument(
        "--features", type=common.ints, default=None, help=f"default {common.NNUNET_FEATURES}; quick 8,16,32,64"
    )
    parser.add_argument("--patch", type=common.triple, default=None, help="default 128; quick 32")
    parser.add_argument("--volume", type=common.triple, default=None, help="W,H,D; default 256,256,256; quick 64,64,48")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch", type=int, default=2)
    parser.add_argument("--weighting", choices=["gaussian", "constant", "hann"], default="gaussian")
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="timed volumes per method (default 5; quick 7)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true")
    args = parser.parse_args()

    from monai.inferers import sliding_window_inference

    from lightning_modules import SlidingWindow, UNet3D
    from lightning_modules.sliding_window import blending_window

    features = args.features or common.ints("8,16,32,64" if args.quick else common.NNUNET_FEATURES)
    patch = args.patch or ((32, 32, 32) if args.quick else (128, 128, 128))
    volume = args.volume or ((64, 64, 48) if args.quick else (256, 256, 256))
    rounds = args.rounds if args.rounds is not None else (7 if args.quick else 5)
    device = common.select_device(args.device, args.quick)
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    torch.manual_seed(args.seed)

    net = UNet3D(args.in_channels, args.classes, features).to(device).eval()
    generator = torch.Generator().manual_seed(args.seed)
    image = torch.randn(args.in_channels, *volume, generator=generator).to(device)
    window = SlidingWindow(tuple(patch), args.overlap, args.sw_batch, args.weighting)
    our_window = blending_window(patch, args.weighting, device)

    def softmax_predictor(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(net(x).float(), dim=1)

    def run_ours() -> torch.Tensor:
        with torch.inference_mode(), common.autocast(device, args.precision):
            return window(image, net)

    def run_monai(same_weights: bool = False) -> torch.Tensor:
        kwargs = {"mode": "constant" if args.weighting == "constant" else "gaussian", "sigma_scale": 0.125}
        if args.weighting == "hann" or same_weights:
            kwargs["roi_weight_map"] = our_window
        with torch.inference_mode(), common.autocast(device, args.precision):
            out = sliding_window_inference(
                image[None],
                roi_size=tuple(patch),
                sw_batch_size=args.sw_batch,
                predictor=softmax_predictor,
                overlap=args.overlap,
                **kwargs,
            )
        return out[0]

    print(common.describe_environment(device, args.precision))
    print(
        f"features {features} | volume {volume} | patch {patch} | overlap {args.overlap} | sw batch {args.sw_batch} "
        f"| weighting {args.weighting} | classes {args.classes}"
    )

    # --- agreement -----------------------------------------------------------------------
    grid_a, grid_b = our_grid(volume, patch, args.overlap), monai_grid(volume, patch, args.overlap)
    same_grid = grid_a == grid_b
    print(f"grids: ours {len(grid_a)} patches, starts per axis {axis_starts(grid_a)}")
    print(
        f"       MONAI {len(grid_b)} patches, starts per axis {axis_starts(grid_b)} -> "
        f"{'identical' if same_grid else 'DIFFERENT'}"
    )
    ours_p = run_ours()
    native_p = run_monai()
    same_p = run_monai(same_weights=True)
    diff_native = (ours_p - native_p).abs()
    diff_same = (ours_p - same_p).abs()
    max_native, max_same = float(diff_native.max()), float(diff_same.max())
    frac_native = float((diff_native > 1e-3).float().mean())
    sum_error = float((ours_p.sum(0) - 1).abs().max())
    tol_same = 1e-5 if args.precision == "32" else 1e-3
    print(
        f"max |Δp| same weights (MONAI given our window): {max_same:.3g}  (tolerance {tol_same:g} if grids identical)"
    )
    print(
        f"max |Δp| native MONAI {args.weighting if args.weighting != 'hann' else 'hann via roi_weight_map'}: "
        f"{max_native:.3g}, mean {float(diff_native.mean()):.3g}, voxels > 1e-3: {100 * frac_native:.3g}%"
    )
    print(f"ours: max |Σ_c p − 1| = {sum_error:.3g}")
    del native_p, same_p, diff_native, diff_same, ours_p
    if same_grid:
        assert max_same <= tol_same, f"same grid and weights but |Δp| = {max_same} > {tol_same}"
    assert max_native <= 0.5, f"probability maps differ by {max_native}"

    # --- timing --------------------------------------------------------------------------
    methods = {"ours (SlidingWindow)": run_ours, "peer (MONAI)": run_monai}
    names = list(methods)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    peak: dict[str, float] = {name: 0.0 for name in names}
    for name in names:  # warm-up (cuDNN autotuning, allocator)
        common.timed(methods[name], device)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if device.type == "cuda":
                common.sync(device)
                resting = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            seconds[name].append(common.timed(methods[name], device))
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) - resting)

    medians = {name: common.median(v) for name, v in seconds.items()}
    headers = ["method", "s/volume (median)", "volumes/s", "s min..max"]
    if device.type == "cuda":
        headers.append("peak GiB above resting")
    rows = []
    for name in names:
        row = [name, medians[name], 1 / medians[name], common.spread(seconds[name])]
        if device.type == "cuda":
            row.append(common.gib(peak[name]))
        rows.append(row)
    print(f"{rounds} timed volumes per method after 1 warm-up, order alternated")
    common.print_table(headers, rows)
    common.emit_ratio("inference", medians[names[0]], medians[names[1]], "s/volume", 1.0, higher_is_better=False)


if __name__ == "__main__":
    main()
