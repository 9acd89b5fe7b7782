"""Training-step throughput of our ``UNet3D`` against nnU-Net's ``PlainConvUNet``.

What: one full training step -- forward, loss, backward, SGD step (lr 1e-2, momentum 0.99,
Nesterov, weight decay 3e-5, as nnU-Net and ``configs/model/unet.yaml``) and
``zero_grad(set_to_none=True)`` -- of ``lightning_modules.unet.UNet3D`` and of
``dynamic_network_architectures``' ``PlainConvUNet`` built with the same topology (stages,
channels, two conv3³-InstanceNorm(eps 1e-5, affine)-LeakyReLU(0.01, inplace) blocks per
stage, stride-2 conv downsampling, stride-2 transposed-conv upsampling, biases, one 1×1×1
head per decoder stage of which only the last is used, no deep supervision). Both use our
``losses.CrossEntropyLoss``, the same input, batch, precision, memory format and
``cudnn.benchmark``, so only the network implementation differs.

Before timing, the script checks that the topologies are identical: equal parameter counts
and, after copying our weights into ``PlainConvUNet`` parameter by parameter, equal outputs
(float32, max |difference| printed).

How: each model gets ``--warmup`` untimed steps (cuDNN autotuning happens there); then
``--rounds`` measurement rounds alternate between the models, the order flipped every round
(A B, B A, A B, ...) so that slow drift of a shared machine cancels; each round times
``--steps`` consecutive steps with the device synchronised before and after. Reported:
the median steps/s over the rounds per model and, on CUDA, the peak memory each model's
steps allocate above the resting state (both models' weights and optimiser states).

Result (last line): ``{"name": "train_step", "ours": <steps/s>, "peer": <steps/s>,
"unit": "steps/s", "ratio": ours/peer}``; target ratio >= 0.95.

    python benchmarks/train_step.py --quick                       # CPU, tiny, < 2 min
    python benchmarks/train_step.py --device cuda --precision bf16  # nnU-Net size
"""

from __future__ import annotations

import common
import torch
from torch import nn


def build_ours(in_channels: int, num_classes: int, features: list[int]) -> nn.Module:
    from lightning_modules.unet import UNet3D

    return UNet3D(in_channels, num_classes, features, deep_supervision=False)


def build_peer(in_channels: int, num_classes: int, features: list[int]) -> nn.Module:
    """nnU-Net's PlainConvUNet with our UNet3D's topology."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n = len(features)
    net = PlainConvUNet(
        input_channels=in_channels,
        n_stages=n,
        features_per_stage=features,
        conv_op=nn.Conv3d,
        kernel_sizes=3,
        strides=[1] + [2] * (n - 1),
        n_conv_per_stage=2,
        num_classes=num_classes,
        n_conv_per_stage_decoder=2,
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=None,
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"negative_slope": 1e-2, "inplace": True},
        deep_supervision=False,
    )
    net.apply(net.initialize)  # nnU-Net's He init; irrelevant for speed
    return net


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())  # parameters() skips PlainConvUNet's aliases


def module_census(net: nn.Module) -> dict[str, int]:
    """How many modules of each compute type (aliases counted once)."""
    census: dict[str, int] = {}
    for module in net.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d, nn.LeakyReLU)):
            census[type(module).__name__] = census.get(type(module).__name__, 0) + 1
    return census


@torch.no_grad()
def copy_ours_into_peer(ours: nn.Module, peer: nn.Module) -> None:
    """Our weights into PlainConvUNet, group by group (asserts every shape matches)."""
    pairs = [
        (ours.encoder, peer.encoder),
        (ours.upsamplers, peer.decoder.transpconvs),
        (ours.decoder, peer.decoder.stages),
        (ours.heads, peer.decoder.seg_layers),
    ]
    for a, b in pairs:
        pa, pb = list(a.parameters()), list(b.parameters())
        assert len(pa) == len(pb), f"{len(pa)} vs {len(pb)} parameters in {type(a).__name__}"
        for x, y in zip(pa, pb):
            assert x.shape == y.shape, f"parameter shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}"
            y.copy_(x)


def check_same_function(ours: nn.Module, peer: nn.Module, in_channels: int, divisor: int) -> float:
    """Max |ours(x) − peer(x)| in float32 on the CPU after copying our weights into a clone of peer."""
    import copy

    ours_cpu = copy.deepcopy(ours).cpu().float()
    peer_cpu = copy.deepcopy(peer).cpu().float()
    copy_ours_into_peer(ours_cpu, peer_cpu)
    size = 2 * divisor
    x = torch.randn(1, in_channels, size, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((ours_cpu(x) - peer_cpu(x)).abs().max())


def main() -> None:
    parser = common.base_parser(__doc__)
    common.add_network_arguments(parser)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default 5; quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per model (default 6; quick 9)")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default 5; quick 3)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last_3d weights and input (both)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off (both)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both forward passes (model.compile=true); compile time reported apart")
    args = parser.parse_args()

    features = args.features or common.ints("8,16,32,64" if args.quick else common.NNUNET_FEATURES)
    patch = args.patch or ((32, 32, 32) if args.quick else (128, 128, 128))
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    rounds = args.rounds if args.rounds is not None else (9 if args.quick else 6)
    steps = args.steps if args.steps is not None else (3 if args.quick else 5)
    device = common.select_device(args.device, args.quick)
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    torch.manual_seed(args.seed)

    from biasseg.losses import CrossEntropyLoss

    divisor = 2 ** (len(features) - 1)
    if any(p % divisor for p in patch):
        raise SystemExit(f"patch {patch} must be divisible by {divisor} for {len(features)} stages")

    nets = {
        "ours (UNet3D)": build_ours(args.in_channels, args.classes, features),
        "peer (PlainConvUNet)": build_peer(args.in_channels, args.classes, features),
    }
    ours, peer = nets.values()
    n_ours, n_peer = count_parameters(ours), count_parameters(peer)
    census_ours, census_peer = module_census(ours), module_census(peer)
    max_diff = check_same_function(ours, peer, args.in_channels, divisor)
    print(common.describe_environment(device, args.precision))
    print(
        f"features {features} | patch {patch} | batch {args.batch} | in {args.in_channels} | classes {args.classes} "
        f"| channels_last {args.channels_last} | compile {args.compile} | cudnn.benchmark {torch.backends.cudnn.benchmark}"
    )
    print(f"parameters: ours {n_ours:,} | peer {n_peer:,}; modules: ours {census_ours} | peer {census_peer}")
    print(f"same function (our weights copied into PlainConvUNet, float32, CPU): max |Δ logits| = {max_diff:.3g}")
    assert n_ours == n_peer, f"parameter counts differ: {n_ours} vs {n_peer}"
    assert census_ours == census_peer, f"module census differs: {census_ours} vs {census_peer}"
    assert max_diff < 1e-4, f"outputs differ by {max_diff} with identical weights"

    memory_format = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.in_channels, *patch, generator=generator).to(device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, args.classes, (args.batch, 1, *patch), generator=generator).to(device)
    loss_fn = CrossEntropyLoss().to(device)

    step_fns = {}
    for name, net in nets.items():
        net.to(device=device, memory_format=memory_format).train()
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)

        forward = torch.compile(net.forward) if args.compile else net

        def step(forward=forward, optimizer=optimizer) -> None:
            with common.autocast(device, args.precision):
                loss = loss_fn(forward(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step_fns[name] = step

    def run(name: str, n: int) -> None:
        for _ in range(n):
            step_fns[name]()

    first_step = {name: common.timed(lambda name=name: run(name, 1), device) for name in nets}  # compiles, with --compile
    for name in nets:
        common.timed(lambda name=name: run(name, warmup), device)

    rates: dict[str, list[float]] = {name: [] for name in nets}
    work_memory: dict[str, float] = {name: 0.0 for name in nets}
    names = list(nets)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if device.type == "cuda":
                common.sync(device)
                resting = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            seconds = common.timed(lambda name=name: run(name, steps), device)
            rates[name].append(steps / seconds)
            if device.type == "cuda":
                work_memory[name] = max(work_memory[name], torch.cuda.max_memory_allocated(device) - resting)

    medians = {name: common.median(v) for name, v in rates.items()}
    headers = ["model", "params", "steps/s (median)", "ms/step", "steps/s min..max"]
    if device.type == "cuda":
        headers.append("step memory GiB")
    rows = []
    for name, net in nets.items():
        row = [name, f"{count_parameters(net):,}", medians[name], 1000 / medians[name], common.spread(rates[name])]
        if device.type == "cuda":
            row.append(common.gib(work_memory[name]))
        rows.append(row)
    print(f"{rounds} rounds x {steps} steps per model after {warmup} warm-up steps, rounds alternated; first step "
          + ", ".join(f"{name} {seconds:.3g} s" for name, seconds in first_step.items())
          + (" (torch.compile's compilation: the first step minus a median step)" if args.compile else ""))
    common.print_table(headers, rows)
    if device.type == "cuda":
        print(
            "step memory = peak allocated during the model's steps minus the resting allocation "
            "(both models' weights + optimiser states stay resident)"
        )
    flops = step_flops(step_fns[names[0]])
    achieved = flops * medians[names[0]] / 1e12
    peak = PEAK_TFLOPS.get(args.precision, {}).get(device_name(device))
    print(f"MFU: {flops / 1e12:.3g} TFLOP per step (torch.utils.flop_counter, forward + backward), ours achieves "
          f"{achieved:.3g} TFLOP/s" + (f" = {achieved / peak:.3f} of the device's {peak:g} dense peak" if peak else
                                       " (no known dense peak for this device: MFU not computed)"))
    common.emit_ratio("train_step", medians[names[0]], medians[names[1]], "steps/s", 0.95, higher_is_better=True)


# dense tensor-core peak TFLOP/s by precision and device-name fragment (NVIDIA data sheets, SXM)
PEAK_TFLOPS = {"bf16": {"H100": 989.0, "H200": 989.0, "A100": 312.0}, "32": {"H100": 67.0, "H200": 67.0, "A100": 19.5}}


def device_name(device: torch.device) -> str | None:
    """The :data:`PEAK_TFLOPS` key that names this device, or None (e.g. a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((key for key in PEAK_TFLOPS["bf16"] if key in name), None)


def step_flops(step) -> float:
    """Floating-point operations of one training step (matmul/convolution FLOPs, counted by
    ``torch.utils.flop_counter.FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


if __name__ == "__main__":
    main()
