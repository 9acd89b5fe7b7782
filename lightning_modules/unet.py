"""A nnU-Net-like 3D U-Net (PlainConvUNet topology).

Each stage is two ``conv3³ → InstanceNorm → LeakyReLU`` blocks; every stage but the first
starts with a stride-2 convolution (no pooling); the decoder upsamples with stride-2
transposed convolutions and concatenates the encoder's skip. Shapes: ``(B, in_channels,
D, H, W) → (B, num_classes, D, H, W)`` logits; every spatial size must be divisible by
``2 ** (len(features) - 1)``.

With ``conditioned`` the network also takes a scalar per image, the Tversky weight ``α`` of
Hong et al.'s hypernetwork (2021): a small MLP maps ``(α, 1 − α)`` to a scale and shift per
channel of every stage's output (FiLM, Perez et al., AAAI 2018), ``x · (1 + γ(α)) + β(α)``.
Hong et al. generate every convolution's weights from ``α`` (HyperMorph-style); FiLM conditions
the same network on ``α`` with a few hundred parameters instead of a copy of every weight per
MLP output, and starts as the plain U-Net (its last layers are zero at initialisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from input_errors import InputError


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """``conv3³(stride) → InstanceNorm(affine) → LeakyReLU(0.01)`` as in nnU-Net."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=True),
        nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


def stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv_block(in_channels, out_channels, stride), conv_block(out_channels, out_channels))


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
    ) -> None:
        super().__init__()
        features = [int(f) for f in features]
        if len(features) < 2 or min(features) < 1:
            raise InputError(f"model.features needs >= 2 positive channel counts, got {features}")
        self.features = features
        self.deep_supervision = deep_supervision
        self.encoder = nn.ModuleList(
            stage(in_channels if i == 0 else features[i - 1], f, stride=1 if i == 0 else 2)
            for i, f in enumerate(features)
        )
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose3d(features[i + 1], features[i], kernel_size=2, stride=2)
            for i in reversed(range(len(features) - 1))
        )
        self.decoder = nn.ModuleList(
            stage(2 * features[i], features[i], stride=1) for i in reversed(range(len(features) - 1))
        )
        self.heads = nn.ModuleList(
            nn.Conv3d(features[i], num_classes, kernel_size=1) for i in reversed(range(len(features) - 1))
        )
        decoder_channels = [features[i] for i in reversed(range(len(features) - 1))]
        self.film = FiLM([*features, *decoder_channels]) if conditioned else None

    @property
    def size_divisor(self) -> int:
        """Every input spatial size must be a multiple of this."""
        return 2 ** (len(self.features) - 1)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | float | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Logits for ``x`` ``(B, in_channels, …)``; a conditioned network also needs ``alpha``
        (a number, or ``(B,)``)."""
        if (alpha is None) != (self.film is None):
            raise ValueError("a conditioned U-Net needs alpha, a plain one takes none")
        if any(s % self.size_divisor for s in x.shape[2:]):
            raise InputError(
                f"U-Net input spatial shape {tuple(x.shape[2:])} must be divisible by "
                f"{self.size_divisor} (2 ** (len(model.features) - 1)); choose data.patch_size accordingly"
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
