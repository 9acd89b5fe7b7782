"""Per-step overhead of the loss and the training metric, and host-device syncs per step.

(a) Cost fraction, for every loss in ``configs/loss/*.yaml`` (composed with Hydra, as
``train.py`` does; built directly if Hydra is missing):

* ``step``: a bare training step of ``UNet3D`` -- forward, loss, backward, gradient clipping
  at 12 (``configs/trainer/default.yaml``), SGD (nnU-Net's: lr 1e-2, momentum 0.99, Nesterov,
  weight decay 3e-5), ``zero_grad(set_to_none=True)``;
* ``loss``: the loss alone, forward + backward, on detached logits of the same shape and
  dtype (bf16 under ``--precision bf16``) that require grad;
* ``log``: the per-step cost of recording the training loss -- the only metric computed
  during training (``SubjectSegmentationMetrics`` runs in validation only). The module sums
  the loss on the device every step (``SegmentationModule.training_step``'s ``epoch_loss +=``,
  replicated and timed here like the loss) and calls ``self.log("train/loss")`` once per epoch
  (``on_train_epoch_end``); the host time of every ``self.log`` call of a real ``pl.Trainer``
  run (below, by wrapping ``module.log``) is divided by its steps and added;
* ``fraction = (loss + log) / step``. The bare step is the denominator, not the Lightning
  step, which is longer (loop, hooks, progress bar, data) and would make the fraction look
  smaller; the Lightning step time is reported beside it. ``log`` is host time: on CUDA it
  overlaps the forward pass already queued on the GPU unless the host is the bottleneck, so
  counting it in full is conservative. ``Lightning/step - 1`` is the whole framework
  overhead (loop, hooks, progress bar, logger, data transfer, and the GPU idling at each
  sync), for comparison.

``step`` and ``loss`` alternate in ``--rounds`` rounds of ``--steps`` repetitions each, the
device synchronised around each block; medians are reported.

(b) Syncs per step: the same loss trains a ``SegmentationModule`` in a real ``pl.Trainer``
(bf16-mixed or 32-true, gradient_clip_val 12, log_every_n_steps 10, progress bar on unless
``--no-progress-bar``, a CSVLogger, as ``configs/trainer/default.yaml`` + ``configs/logger/csv.yaml``; in-memory
batches from a pinned ``DataLoader``; no validation). On CUDA, ``torch.cuda.set_sync_debug_mode
("warn")`` is on from the start of training batch ``warmup`` to the start of batch ``warmup +
10`` -- ten whole loop iterations including one logger flush (log_every_n_steps = 10) -- and
the "called a synchronizing CUDA operation" warnings are counted and attributed to the
first calling frames outside torch (torch's one-time "prototype feature" notice is not counted).
Explicit ``torch.cuda.synchronize()`` calls (only made by this script between timing windows,
outside the counting window) do not warn. On the CPU nothing synchronises, so syncs are
reported as null; as a hint the table then shows a CPU proxy: calls of ``.item()``,
``.tolist()``, ``bool()``/``int()``/``float()`` on tensors, ``.cpu()``, ``.numpy()``,
``nonzero()`` in the same window, counted with a ``TorchFunctionMode``. It is an upper bound:
on the CPU every tensor lives on the host, so it also counts reads that never sync on CUDA.
``--log no-prog-bar|epoch-only`` is a what-if: a subclass whose training_step logs the loss with
other ``self.log`` keywords, to see what a change of the module would save. The Lightning
step time is measured in windows of ``--steps`` loop iterations after the
counting window, synchronised only at the window boundaries.

Result lines (the last two): first ``{"name": "overhead_syncs", "ours": <max syncs/step over
losses, null on CPU>, "peer": 0, "unit": "syncs/step", "ratio": (peer + 1) / (ours + 1)}``
(1.0 at the target of 0 syncs), then, last, ``{"name": "overhead_fraction", "ours": <max
fraction over losses>, "peer": 0.02, "unit": "fraction", "ratio": 0.02 / ours}`` (>= 1 means
within the 2 % target).

    python benchmarks/overhead.py --quick
    python benchmarks/overhead.py --device cuda --precision bf16     # nnU-Net size
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import common
import torch

SYNC_WARNING = "called a synchronizing CUDA operation"  # c10/cuda warn_or_error_on_sync
SYNC_WINDOW = 10  # loop iterations with sync counting: one logger flush at log_every_n_steps = 10
# --log what-ifs: SegmentationModule.training_step's self.log("train/loss", ...) keyword variants
LOG_VARIANTS = {
    "module": None,  # the module's own training_step, unchanged
    "no-prog-bar": {"on_step": True, "on_epoch": True, "prog_bar": False},
    "epoch-only": {"on_step": False, "on_epoch": True, "prog_bar": True},
}
HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero"}


def load_losses(names: list[str] | None) -> tuple[dict[str, torch.nn.Module], str]:
    """Every ``configs/loss`` option, instantiated; the second value says how."""
    config_dir = common.ROOT / "configs"
    available = sorted(p.stem for p in (config_dir / "loss").glob("*.yaml"))
    names = names or available
    try:
        from hydra import compose, initialize_config_dir
        from hydra.utils import instantiate
    except ImportError:
        from biasseg.losses import CompoundLoss, CrossEntropyLoss, SoftDiceLoss

        direct = {
            "ce": lambda: CrossEntropyLoss(),
            "softdice": lambda: SoftDiceLoss(),
            "softdice_batch": lambda: SoftDiceLoss(batch_dice=True),
            "ce_softdice": lambda: CompoundLoss({"ce": CrossEntropyLoss(), "softdice": SoftDiceLoss()}),
        }
        return {n: direct[n]() for n in names}, "built directly (hydra not installed), mirroring configs/loss"
    losses = {}
    with initialize_config_dir(version_base=None, config_dir=str(config_dir)):
        for name in names:
            losses[name] = instantiate(compose(overrides=[f"+loss={name}"]).loss)
    return losses, "configs/loss via Hydra compose + instantiate"


GENERIC_FRAMES = ("site-packages/torch/", "dist-packages/torch/", "/apply_func.py", "benchmarks/overhead.py")
GENERIC_FILES = {"warnings.py", "contextlib.py", "functools.py"}


def is_generic(filename: str) -> bool:
    return any(g in filename for g in GENERIC_FRAMES) or Path(filename).name in GENERIC_FILES


def short(path: str, lineno: int) -> str:
    for marker in ("site-packages/", str(common.ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{lineno}"


def attribute(frame) -> str:
    """The first three calling frames outside torch and generic helpers, innermost first."""
    sites = []
    while frame is not None and len(sites) < 3:
        filename = frame.f_code.co_filename
        if not is_generic(filename):
            sites.append(f"{short(filename, frame.f_lineno)} {frame.f_code.co_name}")
        frame = frame.f_back
    return " <- ".join(sites) or "?"


class HostReadCounter(torch.overrides.TorchFunctionMode):
    """CPU proxy for sync points: counts tensor → host reads by calling source line."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.sites[f"{name} @ {attribute(sys._getframe(1))}"] += 1
        return func(*args, **(kwargs or {}))


class StepProbe:
    """Lightning callback: counts syncs in one window of iterations, times later windows."""

    def __init__(self, device: torch.device, warmup: int, count: bool, windows: int, window_steps: int) -> None:
        import pytorch_lightning as pl

        self.device = device
        self.count_start, self.count_end = warmup, warmup + (SYNC_WINDOW if count else 0)
        self.boundaries = [self.count_end + k * window_steps for k in range(windows + 1)]
        self.window_steps = window_steps
        self.stamps: list[float] = []
        self.sites: collections.Counter[str] = collections.Counter()
        self.counted_steps = 0
        self._warnings = None
        self._mode = None
        probe = self

        class Callback(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                probe.at_batch_start(batch_idx)

            def on_train_end(self, trainer, pl_module):
                probe.stop_counting()

        self.callback = Callback()

    def at_batch_start(self, batch_idx: int) -> None:
        if batch_idx == self.count_end:
            self.stop_counting()
        if batch_idx == self.count_start and self.count_end > self.count_start:
            self.start_counting()
        if batch_idx in self.boundaries:
            common.sync(self.device)
            self.stamps.append(time.perf_counter())

    def start_counting(self) -> None:
        self.counted_steps = self.count_end - self.count_start
        if self.device.type == "cuda":
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            previous = warnings.showwarning

            def record(message, category, filename, lineno, file=None, line=None):
                # torch's per-sync warning; not its one-time "prototype feature ... does not yet detect
                # all synchronizing operations" notice when the mode is first switched on
                if SYNC_WARNING in str(message):  # the Python stack is still live here
                    self.sites[attribute(sys._getframe(1))] += 1
                else:
                    previous(message, category, filename, lineno, file, line)

            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._mode = HostReadCounter()
            self._mode.__enter__()

    def stop_counting(self) -> None:
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(None, None, None)  # restores warnings.showwarning too
            self._warnings = None
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.sites = self._mode.sites
            self._mode = None

    def step_seconds(self) -> list[float]:
        return [(b - a) / self.window_steps for a, b in zip(self.stamps, self.stamps[1:])]


def lightning_run(loss, args, device, features, patch, warmup: int, count: bool) -> dict:
    """Train ``SegmentationModule`` briefly in a real Trainer; syncs, log time, step time."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from lightning_modules import SegmentationModule
    from lightning_modules.poly_schedule import poly_lr

    variant = LOG_VARIANTS[args.log]
    if variant is not None:  # a what-if: the same training_step with other self.log keywords

        class Module(SegmentationModule):
            def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
                image, label = batch["image"]["data"], batch["label"]["data"]
                loss = self.compute_loss(self.net(image), label)
                self.log("train/loss", loss, batch_size=image.shape[0], **variant)
                return loss
    else:
        Module = SegmentationModule

    module = Module(
        loss=loss,
        in_channels=1,
        num_classes=args.classes,
        features=features,
        optimizer=functools.partial(torch.optim.SGD, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5),
        scheduler=functools.partial(poly_lr, power=0.9),
        sliding_window={"patch_size": patch},
    )
    log_seconds: list[float] = []
    original_log = module.log

    def timed_log(*a, **k):
        start = time.perf_counter()
        original_log(*a, **k)
        log_seconds.append(time.perf_counter() - start)

    module.log = timed_log  # type: ignore[method-assign]
    probe = StepProbe(device, warmup, count, args.windows, args.steps)
    total_steps = probe.boundaries[-1] + 1
    generator = torch.Generator().manual_seed(args.seed)
    image = torch.randn(1, *patch, generator=generator)
    label = torch.randint(0, args.classes, (1, *patch), generator=generator)
    samples = [{"image": {"data": image}, "label": {"data": label}}] * (total_steps * args.batch)
    loader = DataLoader(samples, batch_size=args.batch, pin_memory=device.type == "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            precision="bf16-mixed" if args.precision == "bf16" else "32-true",
            max_steps=total_steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            gradient_clip_val=12,
            log_every_n_steps=10,
            enable_progress_bar=not args.no_progress_bar,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=CSVLogger(tmp, name="csv", version=""),
            callbacks=[probe.callback],
            default_root_dir=tmp,
        )
        captured = io.StringIO()  # the progress bar (Rich: stdout; TQDM: stderr) and Lightning's chatter
        try:
            with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Lightning's advice (workers, ...); counting records its own
                trainer.fit(module, train_dataloaders=loader)
        except BaseException:
            sys.stderr.write(captured.getvalue()[-5000:] + "\n")
            raise
    steps_counted = probe.counted_steps or 1
    return {
        "lightning_step": probe.step_seconds(),
        "log_per_step": sum(log_seconds) / total_steps,  # every self.log call of the run, spread over its steps
        "syncs_per_step": sum(probe.sites.values()) / steps_counted if count else None,
        "sites": {k: v / steps_counted for k, v in probe.sites.most_common(6)},
    }


def main() -> None:
    parser = common.base_parser(__doc__)
    common.add_network_arguments(parser)
    parser.add_argument("--losses", default=None, help="comma-separated configs/loss names (default: all)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (manual and Lightning)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds/windows (default 5; quick 5)")
    parser.add_argument("--steps", type=int, default=None, help="steps per round/window (default 3; quick 3)")
    parser.add_argument(
        "--windows", type=int, default=None, help="timed Lightning windows of --steps (default 5; quick 3)"
    )
    parser.add_argument("--grad-clip", type=float, default=12.0, help="clip_grad_norm_ in the bare step (0 = off)")
    parser.add_argument(
        "--no-progress-bar", action="store_true", help="Trainer without progress bar (default: on, as configs)"
    )
    parser.add_argument(
        "--log",
        choices=list(LOG_VARIANTS),
        default="module",
        help="what-if: training_step's self.log keywords (module = the project's code)",
    )
    parser.add_argument("--no-lightning", action="store_true", help="skip the Trainer runs (no log time, no syncs)")
    args = parser.parse_args()
    args.rounds = args.rounds if args.rounds is not None else 5
    args.steps = args.steps if args.steps is not None else 3
    args.windows = args.windows if args.windows is not None else (3 if args.quick else 5)

    features = args.features or common.ints("8,16,32,64" if args.quick else common.NNUNET_FEATURES)
    patch = args.patch or ((32, 32, 32) if args.quick else (128, 128, 128))
    device = common.select_device(args.device, args.quick)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)

    import pytorch_lightning  # noqa: F401  (sets its loggers to INFO on import; quiet them after)

    from lightning_modules import UNet3D

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    losses, how = load_losses(args.losses.split(",") if args.losses else None)
    print(common.describe_environment(device, args.precision))
    print(f"features {features} | patch {patch} | batch {args.batch} | classes {args.classes} | losses: {how}")
    if args.log != "module":
        print(f"WHAT-IF: training_step logs with {LOG_VARIANTS[args.log]} instead of the module's own self.log call")

    # --- (a) bare step vs loss forward + backward -----------------------------------------
    net = UNet3D(1, args.classes, features).to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 1, *patch, generator=generator).to(device)
    y = torch.randint(0, args.classes, (args.batch, 1, *patch), generator=generator).to(device)
    with torch.no_grad(), common.autocast(device, args.precision):
        logits_value = net(x)

    results = {}
    for name, loss in losses.items():
        loss = loss.to(device)

        def full_step(loss=loss) -> None:
            with common.autocast(device, args.precision):
                value = loss(net(x), y)
            value.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def loss_only(loss=loss) -> None:
            logits = logits_value.detach().requires_grad_()
            with common.autocast(device, args.precision):
                value = loss(logits, y)
            value.backward()

        epoch_loss = torch.zeros(2, device=device)
        with torch.no_grad():
            loss_value = loss(logits_value, y)

        def bookkeeping(value=loss_value) -> None:  # SegmentationModule.training_step's per-step loss sum
            nonlocal epoch_loss
            epoch_loss += torch.stack([value.float() * x.shape[0], value.new_tensor(float(x.shape[0]))])

        def repeat(fn, n=args.steps):
            return lambda: [fn() for _ in range(n)]

        common.timed(repeat(full_step, args.warmup), device)
        common.timed(repeat(loss_only, args.warmup), device)
        step_s, loss_s, sum_s = [], [], []
        for r in range(args.rounds):
            pair = [(full_step, step_s), (loss_only, loss_s)]
            for fn, out in pair if r % 2 == 0 else pair[::-1]:
                out.append(common.timed(repeat(fn), device) / args.steps)
            sum_s.append(common.timed(repeat(bookkeeping), device) / args.steps)
        results[name] = {"step": common.median(step_s), "loss": common.median(loss_s), "step_runs": step_s,
                         "loss_sum": common.median(sum_s)}

    # --- (b) real Trainer: log time, syncs, Lightning step time --------------------------
    for name, loss in losses.items():
        if args.no_lightning:
            results[name].update(log=results[name]["loss_sum"], lightning=float("nan"), syncs=None, sites={})
            continue
        run = lightning_run(loss, args, device, features, patch, args.warmup, count=True)
        results[name].update(
            log=results[name]["loss_sum"] + run["log_per_step"],
            lightning=common.median(run["lightning_step"]),
            syncs=run["syncs_per_step"] if device.type == "cuda" else None,
            proxy=run["syncs_per_step"] if device.type != "cuda" else None,
            sites=run["sites"],
        )

    rows = []
    for name, r in results.items():
        r["fraction"] = (r["loss"] + r["log"]) / r["step"]
        r["fraction_lightning"] = (r["loss"] + r["log"]) / r["lightning"]
        rows.append(
            [
                name,
                1000 * r["step"],
                1000 * r["loss"],
                1000 * r["log"],
                r["fraction"],
                1000 * r["lightning"],
                r["fraction_lightning"],
                r["lightning"] / r["step"] - 1,
                r["syncs"] if device.type == "cuda" else f"null (proxy {r.get('proxy', 0):.3g})",
            ]
        )
    print(
        f"medians of {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps; "
        f"syncs counted over {SYNC_WINDOW} Lightning iterations"
    )
    common.print_table(
        [
            "loss",
            "step ms",
            "loss f+b ms",
            "log ms",
            "fraction",
            "Lightning step ms",
            "frac. of Lightning",
            "Lightning/step - 1",
            "syncs/step",
        ],
        rows,
    )
    for name, r in results.items():
        if r["sites"]:
            kind = "syncs" if device.type == "cuda" else "host reads (CPU proxy, upper bound)"
            print(f"{name}: {kind} per step by source: " + "; ".join(f"{k} x{v:.2g}" for k, v in r["sites"].items()))
    if device.type != "cuda":
        print("syncs/step: null -- no host-device synchronisation exists on the CPU; run with --device cuda")

    worst = max(r["fraction"] for r in results.values())
    syncs = [r["syncs"] for r in results.values() if r["syncs"] is not None]
    worst_syncs = max(syncs) if syncs else None
    print(f"worst fraction {worst:.4f} (target <= 0.02); worst syncs/step {worst_syncs} (target 0)")
    common.emit("overhead_syncs", worst_syncs, 0, "syncs/step", None if worst_syncs is None else 1 / (1 + worst_syncs))
    common.emit("overhead_fraction", worst, 0.02, "fraction", 0.02 / worst)


if __name__ == "__main__":
    main()
