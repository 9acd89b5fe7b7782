"""Weighted sums of losses, e.g. nnU-Net's DC+CE."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from biasseg.errors import InputError


class CompoundLoss(nn.Module):
    """``Σ_k weights[k] · terms[k](logits, target)``.

    Args:
        terms: named loss modules, each called as ``loss(logits, target)``.
        weights: weight per term name; a missing name weighs 1.
    """

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not terms:
            raise InputError("CompoundLoss needs at least one term")
        weights = dict(weights or {})
        unknown = set(weights) - set(terms)
        if unknown:
            raise InputError(f"weights name unknown terms {sorted(unknown)}; terms are {sorted(terms)}")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {name: float(weights.get(name, 1.0)) for name in terms}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[name] * term(logits, target) for name, term in self.terms.items())
