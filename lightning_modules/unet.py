"""A nnU-Net-like 3D U-Net (PlainConvUNet topology).

Each stage is two ``conv → InstanceNorm → LeakyReLU`` blocks; every stage but the first
starts with a strided convolution (no pooling); the decoder upsamples with transposed
convolutions of the same strides and concatenates the encoder's skip. Strides and kernel
sizes are per stage and axis (nnU-Net's plan for thick slices: ``[1, 2, 2]`` strides and
``[1, 3, 3]`` kernels until the in-plane spacing has caught up, :mod:`datamodules.plan`);
by default 2 and 3 along every axis. Shapes: ``(B, in_channels, W, H, D) → (B, num_classes,
W, H, D)`` logits; each spatial size must be divisible by the product of its axis's strides.

With ``conditioned`` the network also takes a scalar per image, the Tversky weight ``α`` of
Hong et al.'s hypernetwork (2021): a small MLP maps ``(α, 1 − α)`` to a scale and shift per
channel of every stage's output (FiLM, Perez et al., AAAI 2018), ``x · (1 + γ(α)) + β(α)``.
Hong et al. generate every convolution's weights from ``α`` (HyperMorph-style); FiLM conditions
the same network on ``α`` with a few hundred parameters instead of a copy of every weight per
MLP output, and starts as the plain U-Net (its last layers are zero at initialisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from biasseg.errors import InputError


def conv_block(in_channels: int, out_channels: int, stride: Sequence[int] = (1, 1, 1),
               kernel: Sequence[int] = (3, 3, 3)) -> nn.Sequential:
    """``conv(kernel, stride) → InstanceNorm(affine) → LeakyReLU(0.01)`` as in nnU-Net."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=tuple(kernel), stride=tuple(stride),
                  padding=tuple(k // 2 for k in kernel), bias=True),
        nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


def stage(in_channels: int, out_channels: int, stride: Sequence[int], kernel: Sequence[int] = (3, 3, 3)) -> nn.Sequential:
    return nn.Sequential(conv_block(in_channels, out_channels, stride, kernel), conv_block(out_channels, out_channels, (1, 1, 1), kernel))


def checked_topology(features: Sequence[int], strides: Sequence[Sequence[int]] | None,
                     kernel_sizes: Sequence[Sequence[int]] | None) -> tuple[list[list[int]], list[list[int]]]:
    """Per-stage strides (``len(features) − 1`` of them, each 1 or 2 per axis) and kernel sizes
    (``len(features)``, each 1 or 3 per axis); None gives 2 and 3 along every axis."""
    stages = len(features)
    strides = [[2, 2, 2]] * (stages - 1) if strides is None else [[int(v) for v in s] for s in strides]
    kernels = [[3, 3, 3]] * stages if kernel_sizes is None else [[int(v) for v in k] for k in kernel_sizes]
    if len(strides) != stages - 1 or any(len(s) != 3 or not set(s) <= {1, 2} for s in strides):
        raise InputError(f"model.strides must give {stages - 1} stage strides of three values 1 or 2, got {strides}")
    if len(kernels) != stages or any(len(k) != 3 or not set(k) <= {1, 3} for k in kernels):
        raise InputError(f"model.kernel_sizes must give {stages} stage kernels of three values 1 or 3, got {kernels}")
    return strides, kernels


class FiLM(nn.Module):
    """Per-channel scale and shift of each stage from a scalar condition ``α`` (one per image)."""

    HIDDEN = 32

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.embed = nn.Sequential(nn.Linear(2, self.HIDDEN), nn.ReLU(), nn.Linear(self.HIDDEN, self.HIDDEN), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(self.HIDDEN, 2 * c) for c in self.channels)
        for head in self.heads:  # identity at initialisation: the plain U-Net
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, alpha: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(γ, β)`` per stage, each ``(B, channels, 1, 1, 1)``, for ``alpha`` ``(B,)``."""
        hidden = self.embed(torch.stack([alpha, 1 - alpha], dim=1))
        out = []
        for head, c in zip(self.heads, self.channels):
            gamma, beta = head(hidden).view(-1, 2 * c, 1, 1, 1).split(c, dim=1)
            out.append((gamma, beta))
        return out


class UNet3D(nn.Module):
    """3D U-Net; ``features`` gives the channels per resolution stage (depth = its length).

    With ``deep_supervision`` the training forward returns a list of logits, full resolution
    first, then one per coarser decoder stage (nnU-Net convention); ``eval()`` returns only
    the full-resolution logits.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        features: Sequence[int] = (8, 16, 32, 64),
        deep_supervision: bool = False,
        conditioned: bool = False,
        strides: Sequence[Sequence[int]] | None = None,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        features = [int(f) for f in features]
        if len(features) < 2 or min(features) < 1:
            raise InputError(f"model.features needs >= 2 positive channel counts, got {features}")
        self.features = features
        self.strides, self.kernel_sizes = checked_topology(features, strides, kernel_sizes)
        self.deep_supervision = deep_supervision
        self.encoder = nn.ModuleList(
            stage(in_channels if i == 0 else features[i - 1], f, [1, 1, 1] if i == 0 else self.strides[i - 1], self.kernel_sizes[i])
            for i, f in enumerate(features)
        )
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose3d(features[i + 1], features[i], kernel_size=self.strides[i], stride=self.strides[i])
            for i in reversed(range(len(features) - 1))
        )
        self.decoder = nn.ModuleList(
            stage(2 * features[i], features[i], [1, 1, 1], self.kernel_sizes[i]) for i in reversed(range(len(features) - 1))
        )
        self.heads = nn.ModuleList(
            nn.Conv3d(features[i], num_classes, kernel_size=1) for i in reversed(range(len(features) - 1))
        )
        decoder_channels = [features[i] for i in reversed(range(len(features) - 1))]
        self.film = FiLM([*features, *decoder_channels]) if conditioned else None

    @property
    def size_divisors(self) -> tuple[int, int, int]:
        """Each input spatial size must be a multiple of its axis's divisor (the product of its strides)."""
        return tuple(int(math.prod(s[axis] for s in self.strides)) for axis in range(3))

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | float | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Logits for ``x`` ``(B, in_channels, …)``; a conditioned network also needs ``alpha``
        (a number, or ``(B,)``)."""
        if (alpha is None) != (self.film is None):
            raise ValueError("a conditioned U-Net needs alpha, a plain one takes none")
        if any(s % d for s, d in zip(x.shape[2:], self.size_divisors)):
            raise InputError(
                f"U-Net input spatial shape {tuple(x.shape[2:])} must be divisible by "
                f"{list(self.size_divisors)} (the product of each axis's strides); choose data.patch_size accordingly"
            )
        modulation = iter(self.film(torch.as_tensor(alpha, dtype=x.dtype, device=x.device).expand(x.shape[0]))
                          if self.film is not None else [])

        def modulate(features: torch.Tensor) -> torch.Tensor:
            scale_shift = next(modulation, None)
            return features if scale_shift is None else features * (1 + scale_shift[0]) + scale_shift[1]

        skips = []
        for encode in self.encoder:
            x = modulate(encode(x))
            skips.append(x)
        supervise = self.deep_supervision and self.training
        outputs = []
        last = len(self.decoder) - 1
        for i, (up, decode, head, skip) in enumerate(
            zip(self.upsamplers, self.decoder, self.heads, reversed(skips[:-1]))
        ):
            x = modulate(decode(torch.cat([up(x), skip], dim=1)))
            if supervise or i == last:
                outputs.append(head(x))
        return outputs[::-1] if supervise else outputs[-1]
