"""Whole-volume inference over trained networks: one network, a Tversky hypernetwork's
marginal over its inference α, a deep ensemble's mean, or a cross-validation where each case
is scored by the fold model that validated on it.

Kept out of the trained module: a :class:`~lightning_modules.segmentation_module.SegmentationModule`
trains and validates one network, and validates through its ``predictor`` (a predictor of
itself unless evaluate.py gives it one of several checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning_modules.segmentation_module import SegmentationModule


class Predictor:
    """Averages the probability maps ``(C, W, H, D)`` of ``members`` (the first one's device,
    classes and activation), each a sample for the generalised energy distance.

    Args:
        members: trained modules segmenting the same classes from the same channels and
            preprocessing (:func:`lightning_modules.checkpoints.load_ensemble` checks it).
        alpha: a Tversky hypernetwork's α at inference; None = each hypernetwork's marginal
            over its ``inference_alphas`` (every α's map a sample).
        case_members: cross-validation, ``{case: index of the member that scores it}``;
            None = every member scores every case.
    """

    def __init__(self, members: Sequence[SegmentationModule], alpha: float | None = None,
                 case_members: Mapping[str, int] | None = None) -> None:
        if not members:
            raise ValueError("a predictor needs at least one trained module")
        self.members, self.alpha = list(members), alpha
        self.case_members = None if case_members is None else dict(case_members)

    @property
    def first(self) -> SegmentationModule:
        return self.members[0]

    def maps(self, image: torch.Tensor, case: str | None = None) -> Iterator[torch.Tensor]:
        """Every map that enters the mean: per member (only the case's in a cross-validation),
        one per inference α of a hypernetwork."""
        members = self.members if self.case_members is None else [self.members[self.case_members[case]]]
        device = self.first.device
        for module in members:
            module.to(device)  # the members follow the module the Trainer placed
            alphas = [self.alpha] if module.hypernet is None or self.alpha is not None else module.hypernet["inference_alphas"]
            for alpha in alphas:
                yield module.probabilities(image, alpha)

    @torch.no_grad()
    def predict_with_samples(self, image: torch.Tensor, keep_samples: bool = True,
                             case: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mean map ``(C, W, H, D)`` and, where several maps enter it and ``keep_samples``,
        each one's hard segmentation ``(M, W, H, D)`` (uint8; ``(M, R, W, H, D)`` with regions)."""
        total, count, samples = None, 0, []
        for probabilities in self.maps(image, case):
            total = probabilities if total is None else total + probabilities
            count += 1
            if keep_samples:
                samples.append(self.first.segmentation(probabilities))
        assert total is not None
        return total / count, (torch.stack(samples) if len(samples) > 1 else None)

    def predict_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """The mean map alone, on the first member's device."""
        return self.predict_with_samples(image, keep_samples=False)[0]
