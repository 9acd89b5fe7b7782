"""Loss values and gradients, and equality with MONAI (or the authors' formulas) under matched options."""

from functools import cache

import pytest
import torch
import torch.nn.functional as F
from helpers import CONFIG_DIR, compose_config
from hydra.utils import instantiate
from monai.losses import DiceCELoss, DiceLoss, FocalLoss, GeneralizedDiceLoss, TverskyLoss
from monai.losses.unified_focal_loss import AsymmetricFocalLoss, AsymmetricFocalTverskyLoss

import biasseg.losses.soft_dice
from biasseg.losses import CompoundLoss, CrossEntropyLoss, SoftDiceLoss, UnifiedFocalLoss
from biasseg.losses.cross_entropy import focal_cross_entropy

LOSS_OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml"))


def random_case(num_classes: int, batch: int = 3, shape=(6, 5, 4), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, *shape, generator=generator, requires_grad=True)
    target = torch.randint(0, num_classes, (batch, 1, *shape), generator=generator)
    return logits, target


def soft_target(num_classes: int, batch: int = 3, shape=(6, 5, 4), seed: int = 1) -> torch.Tensor:
    """Class probabilities strictly inside (0, 1), summing to 1 over classes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(batch, num_classes, *shape, generator=generator), dim=1)


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(target[:, 0], num_classes).movedim(-1, 1).float()


def perfect_logits(target: torch.Tensor, num_classes: int, scale: float = 50.0) -> torch.Tensor:
    return scale * one_hot(target, num_classes)


@cache
def loss_config(name: str):
    return compose_config([f"loss={name}"]).loss


def value_and_gradient(loss, logits, target):
    value = loss(logits, target)
    gradient, = torch.autograd.grad(value, logits)
    return value, gradient


# --- every configured loss ----------------------------------------------------------------
@pytest.mark.parametrize("name", LOSS_OPTIONS)
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_every_configured_loss_has_finite_value_and_gradient(name, num_classes, soft):
    loss = instantiate(loss_config(name))
    logits, target = random_case(num_classes)
    if soft:
        target = soft_target(num_classes)
    value, gradient = value_and_gradient(loss, logits, target)
    assert torch.isfinite(value) and torch.isfinite(gradient).all() and gradient.abs().sum() > 0


@pytest.mark.parametrize("name", LOSS_OPTIONS)
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_every_configured_loss_is_finite_with_empty_foreground_classes(name, num_classes, soft):
    loss = instantiate(loss_config(name))
    logits, target = random_case(num_classes)
    target[target == num_classes - 1] = 0  # the last class is absent from the whole batch
    target[0] = 0  # and the first image has no foreground at all
    target = one_hot(target, num_classes) if soft else target
    if soft:  # nearly absent elsewhere: tiny but non-zero probabilities
        target[1:, num_classes - 1] = 1e-12
    value, gradient = value_and_gradient(loss, logits, target)
    assert torch.isfinite(value) and torch.isfinite(gradient).all()


@pytest.mark.parametrize("option", LOSS_OPTIONS)
def test_every_loss_option_rewards_the_right_segmentation(option):
    """Each ``loss=`` option builds from its config and is lower on a confident, correct
    prediction than on an uninformative one (equal logits), with finite gradients (a confident,
    wrong prediction is no fair comparison: Nordström's surrogate has a pole there, below); the
    catalogue holds the losses the README and the study name."""
    assert set(LOSS_OPTIONS) >= {"ce", "focal", "softdice", "softdice_batch", "ce_softdice", "softjaccard", "gdl",
                                 "tversky", "dscpp", "unified_focal", "softdice_softlabel", "calibrated_dice"}
    loss = instantiate(compose_config([f"loss={option}"]).loss)
    _, target = random_case(3)
    right = perfect_logits(target, 3, scale=8.0).requires_grad_()
    value, gradient = value_and_gradient(loss, right, target)
    assert torch.isfinite(value) and torch.isfinite(gradient).all()
    assert value < loss(torch.zeros_like(right), target), option


# --- soft Dice: the nnU-Net conventions -------------------------------------------------
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_perfect_prediction_gives_zero_soft_dice(num_classes, batch_dice):
    _, target = random_case(num_classes)
    loss = SoftDiceLoss(batch_dice=batch_dice)(perfect_logits(target, num_classes), target)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_perfect_prediction_gives_zero_cross_entropy():
    _, target = random_case(3)
    assert CrossEntropyLoss()(perfect_logits(target, 3), target).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_dice_by_hand():
    # one image, 2 classes, 4 voxels: p(fg) = [0.9, 0.2, 0.5, 0.1] via logits, y = [1, 0, 1, 0]
    p = torch.tensor([0.9, 0.2, 0.5, 0.1])
    logits = torch.stack([torch.zeros(4), torch.log(p / (1 - p))]).view(1, 2, 4, 1, 1)
    target = torch.tensor([1, 0, 1, 0]).view(1, 1, 4, 1, 1)
    expected = 1 - (2 * (0.9 + 0.5) + 1e-5) / (p.sum() + 2 + 1e-5)
    assert SoftDiceLoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_per_image_differs_from_per_batch():
    logits, target = random_case(2, batch=4, seed=3)
    target[0] = 0  # an image without foreground makes the two reductions differ markedly
    per_image = SoftDiceLoss(batch_dice=False)(logits, target)
    per_batch = SoftDiceLoss(batch_dice=True)(logits, target)
    assert abs(per_image.item() - per_batch.item()) > 1e-2


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
def test_soft_dice_equals_monai(num_classes, batch, squared, include_background):
    logits, target = random_case(num_classes, seed=num_classes + 2 * batch)
    ours, grad_ours = value_and_gradient(SoftDiceLoss(batch_dice=batch, squared=squared, include_background=include_background,
                                                      smooth_nr=1e-5, smooth_dr=1e-5), logits, target)
    theirs, grad_theirs = value_and_gradient(DiceLoss(include_background=include_background, to_onehot_y=True, softmax=True,
                                                      batch=batch, squared_pred=squared, smooth_nr=1e-5, smooth_dr=1e-5),
                                             logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-4, atol=1e-7)


# --- Jaccard and Tversky: the same score with other alpha, beta ---------------------------
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("batch", [False, True])
def test_soft_jaccard_equals_monai(num_classes, squared, batch):
    logits, target = random_case(num_classes)
    # alpha = beta = 1 smooths exactly as MONAI's jaccard: (2TP + nr) / (2(S - TP) + dr)
    ours = SoftDiceLoss(alpha=1, beta=1, squared=squared, batch_dice=batch)(logits, target)
    theirs = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, jaccard=True, batch=batch,
                      squared_pred=squared, smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_soft_jaccard_by_hand():
    logits, target = random_case(2, batch=1)
    p, y = torch.softmax(logits, 1)[:, 1], one_hot(target, 2)[:, 1]
    jaccard = (p * y).sum() / (p.sum() + y.sum() - (p * y).sum())
    ours = SoftDiceLoss(alpha=1, beta=1, smooth_nr=0, smooth_dr=0)(logits, target)
    assert ours.item() == pytest.approx(1 - jaccard.item(), rel=1e-6)


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("alpha, beta", [(0.3, 0.7), (0.8, 0.2), (1.0, 1.0)])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_tversky_equals_monai(num_classes, alpha, beta, soft):
    logits, target = random_case(num_classes)
    if soft:
        target = soft_target(num_classes)
    probs = torch.softmax(logits, 1)  # softmax over all classes before MONAI drops the background
    theirs = TverskyLoss(include_background=False, alpha=alpha, beta=beta, smooth_nr=1e-5, smooth_dr=1e-5)(
        probs, target if soft else one_hot(target, num_classes))
    # MONAI smooths (TP + s) / (TP + aFP + bFN + s): ours with 2s
    ours = SoftDiceLoss(alpha=alpha, beta=beta, smooth_nr=2e-5, smooth_dr=2e-5)(logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


# --- generalised Dice -------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("weights", ["square", "simple", "uniform"])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
def test_generalised_dice_equals_monai(num_classes, weights, batch, include_background):
    logits, target = random_case(num_classes, seed=5)
    target[0][target[0] == 1] = 0  # class 1 absent from image 0: an infinite weight to replace
    ours = SoftDiceLoss(generalised=weights, batch_dice=batch, include_background=include_background)
    theirs = GeneralizedDiceLoss(include_background=include_background, to_onehot_y=True, softmax=True,
                                 w_type=weights, batch=batch, smooth_nr=1e-5, smooth_dr=1e-5)
    value_ours, grad_ours = value_and_gradient(ours, logits, target)
    value_theirs, grad_theirs = value_and_gradient(theirs, logits, target)
    assert value_ours.item() == pytest.approx(value_theirs.item(), rel=1e-5)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-4, atol=1e-7)


def test_generalised_dice_with_soft_labels_equals_monai():
    logits, _ = random_case(3)
    target = soft_target(3)
    ours = SoftDiceLoss(generalised="square", include_background=True, soft_label=True)(logits, target)
    theirs = GeneralizedDiceLoss(include_background=True, softmax=True, soft_label=True)(logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_generalised_dice_of_one_class_is_plain_dice():
    logits, target = random_case(2)
    generalised = SoftDiceLoss(generalised="square", smooth_nr=0, smooth_dr=0)(logits, target)
    assert generalised.item() == pytest.approx(SoftDiceLoss(smooth_nr=0, smooth_dr=0)(logits, target).item(), rel=1e-6)


def test_generalised_dice_with_a_nearly_absent_soft_class_equals_monai():
    logits, target = random_case(3, batch=1)
    target = one_hot(target, 3)
    target[:, 2] = 1e-21  # weight ~1e38: w * (sum p + sum y) overflows, the score is ~0
    ours, grad_ours = value_and_gradient(SoftDiceLoss(generalised="square"), logits, target)
    theirs, grad_theirs = value_and_gradient(GeneralizedDiceLoss(include_background=False, softmax=True),
                                             logits, target)
    assert torch.isfinite(grad_ours).all() and ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs)


# --- DSC++ ------------------------------------------------------------------------------
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_dscpp_with_exponent_one_is_soft_dice(soft):
    logits, target = random_case(3)
    if soft:
        target = soft_target(3)
    for batch in (False, True):
        dscpp = SoftDiceLoss(error_exponent=1.0, batch_dice=batch)(logits, target)
        assert dscpp.item() == pytest.approx(SoftDiceLoss(batch_dice=batch)(logits, target).item(), rel=1e-6)


@pytest.mark.parametrize("gamma", [2.0, 3.0])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_dscpp_equals_the_authors_formula(gamma, soft):
    logits, target = random_case(3)
    y = soft_target(3) if soft else one_hot(target, 3)
    # Yeung et al.'s reference code, per image and class, background included here
    p, eps, axes = torch.softmax(logits, 1), 1e-7, (2, 3, 4)
    tp = (y * p).sum(axes)
    fn = ((y * (1 - p)) ** gamma).sum(axes)
    fp = (((1 - y) * p) ** gamma).sum(axes)
    expected = (1 - (tp + eps) / (tp + 0.5 * fn + 0.5 * fp + eps)).mean()
    ours = SoftDiceLoss(error_exponent=gamma, include_background=True, smooth_nr=2 * eps, smooth_dr=2 * eps)
    assert ours(logits, y if soft else target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_dscpp_penalises_confident_errors_less_than_soft_dice():
    logits, target = random_case(2)
    assert SoftDiceLoss(error_exponent=2.0)(logits, target) < SoftDiceLoss()(logits, target)


# --- soft-label (semimetric) Dice and Jaccard -------------------------------------------
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("alpha", [0.5, 1.0], ids=["dice", "jaccard"])
@pytest.mark.parametrize("batch", [False, True])
def test_soft_label_losses_vanish_at_the_soft_target(num_classes, alpha, batch):
    target = soft_target(num_classes)
    logits = target.log()
    semimetric = SoftDiceLoss(alpha=alpha, beta=alpha, soft_label=True, batch_dice=batch)(logits, target)
    plain = SoftDiceLoss(alpha=alpha, beta=alpha, batch_dice=batch)(logits, target)
    assert semimetric.item() == pytest.approx(0.0, abs=1e-6)
    assert plain.item() > 0.05


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("alpha", [0.5, 1.0], ids=["dice", "jaccard"])
@pytest.mark.parametrize("batch", [False, True])
def test_soft_label_losses_equal_plain_ones_on_hard_targets(num_classes, alpha, batch):
    logits, target = random_case(num_classes)
    for hard in (target, one_hot(target, num_classes)):
        semimetric, grad_semimetric = value_and_gradient(
            SoftDiceLoss(alpha=alpha, beta=alpha, soft_label=True, batch_dice=batch), logits, hard)
        plain, grad_plain = value_and_gradient(SoftDiceLoss(alpha=alpha, beta=alpha, batch_dice=batch), logits, hard)
        assert semimetric.item() == pytest.approx(plain.item(), rel=1e-5)
        torch.testing.assert_close(grad_semimetric, grad_plain, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("jaccard", [False, True])
@pytest.mark.parametrize("batch", [False, True])
def test_soft_label_losses_equal_monai(num_classes, jaccard, batch):
    logits, _ = random_case(num_classes)
    target = soft_target(num_classes)
    weight = 1.0 if jaccard else 0.5
    ours = SoftDiceLoss(alpha=weight, beta=weight, soft_label=True, batch_dice=batch)(logits, target)
    theirs = DiceLoss(include_background=False, softmax=True, jaccard=jaccard, batch=batch, soft_label=True,
                      smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_soft_label_losses_by_hand():
    logits, _ = random_case(2, batch=1)
    target = soft_target(2, batch=1)
    p, y = torch.softmax(logits, 1)[:, 1], target[:, 1]
    total, difference = p.sum() + y.sum(), (p - y).abs().sum()
    dml = SoftDiceLoss(soft_label=True, smooth_nr=0, smooth_dr=0)(logits, target)
    jml = SoftDiceLoss(alpha=1, beta=1, soft_label=True, smooth_nr=0, smooth_dr=0)(logits, target)
    assert dml.item() == pytest.approx(1 - ((total - difference) / total).item(), rel=1e-5)
    assert jml.item() == pytest.approx(1 - ((total - difference) / (total + difference)).item(), rel=1e-5)


# --- batch sums pooled across processes -------------------------------------------------
@pytest.mark.parametrize("loss", [
    SoftDiceLoss(batch_dice=True, pool_across_processes=True),
    SoftDiceLoss(batch_dice=True, pool_across_processes=True, alpha=1, beta=1, squared=True),
    SoftDiceLoss(batch_dice=True, pool_across_processes=True, alpha=0.3, beta=0.7, soft_label=True),
    SoftDiceLoss(batch_dice=True, pool_across_processes=True, error_exponent=2),
    SoftDiceLoss(batch_dice=True, pool_across_processes=True, generalised="square", include_background=True),
    UnifiedFocalLoss(batch_dice=True, pool_across_processes=True),
], ids=["dice", "squared_jaccard", "softlabel_tversky", "dscpp", "gdl", "unified_focal"])
def test_pooling_across_processes_equals_one_process_with_the_whole_batch(loss, monkeypatch):
    # two processes holding the same shard: the all-reduce doubles the sums (and the gradients)
    monkeypatch.setattr(biasseg.losses.soft_dice, "sum_across_processes", lambda sums: 2 * sums)
    logits, target = random_case(3, batch=2)
    target[0][target[0] == 2] = 0  # an absent class in one image
    local_value, local_grad = value_and_gradient(loss, logits, target)
    monkeypatch.undo()
    whole = torch.cat([logits, logits]).detach().requires_grad_()
    whole_value, whole_grad = value_and_gradient(loss, whole, torch.cat([target, target]))
    assert local_value.item() == pytest.approx(whole_value.item(), rel=1e-5)
    # DDP averages over the 2 processes: the local gradient / 2 is the whole batch's for the shard
    torch.testing.assert_close(local_grad / 2, whole_grad[:2], rtol=1e-4, atol=1e-7)


# --- cross-entropy and focal loss -------------------------------------------------------
# --- Nordström et al.'s calibrated surrogate ------------------------------------------------
def nordstrom_score(z, y):
    """The paper's construction written out for one binary image (numpy, float64): log-odds ``z``
    and a 0/1 or soft reference ``y`` (flat), ``φ(m) = log₂(1 + e^{−m})``."""
    import numpy as np

    phi = lambda m: np.log2(1 + np.exp(-m))  # noqa: E731
    tp = np.sum(y * (1 - phi(z)))
    fp = np.sum((1 - y) * phi(-z))
    return 2 * tp / (np.sum(y) + tp + fp)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_calibrated_surrogate_equals_the_formula_written_out(soft):
    import numpy as np
    from scipy.optimize import approx_fprime

    logits, target = random_case(2, batch=2)
    if soft:
        target = soft_target(2, batch=2)
    loss = SoftDiceLoss(calibrated_surrogate=True, smooth_nr=0, smooth_dr=0)
    value, gradient = value_and_gradient(loss, logits.double(), target.double() if soft else target)
    y = (target[:, 1] if soft else (target[:, 0] == 1).double()).numpy().reshape(2, -1)
    base = logits.detach().double().numpy()

    def by_hand(flat):
        z = flat.reshape(base.shape)
        z = (z[:, 1] - z[:, 0]).reshape(2, -1)  # two classes: the log-odds are the logits' difference
        return 1 - np.mean([nordstrom_score(z[b], y[b]) for b in range(2)])

    assert value.item() == pytest.approx(by_hand(base.ravel()), rel=1e-6)  # the loss computes in float32
    numeric = approx_fprime(base.ravel(), by_hand, 1e-6).reshape(base.shape)
    torch.testing.assert_close(gradient.double(), torch.from_numpy(numeric), atol=2e-5, rtol=1e-3)


def test_calibrated_surrogate_is_a_lower_bound_of_the_dice_of_its_decision():
    # on its domain: TP (a lower bound itself) may be negative, and beyond TP = −(Σy + FP) the
    # denominator changes sign (the pole documented in losses.soft_dice)
    checked = 0
    for seed in range(40):
        logits, target = random_case(2, batch=1, seed=seed)
        reference = target[:, 0] == 1
        logits = (logits.detach() + 2 * (2 * reference[:, None].float() - 1)) * (1 + seed % 8)  # soft to nearly hard
        loss = SoftDiceLoss(calibrated_surrogate=True, smooth_nr=0, smooth_dr=0)
        score = loss.scores(logits, target)
        z = logits[:, 1] - logits[:, 0]
        tp = (reference * (1 - F.softplus(-z) / torch.log(torch.tensor(2.0)))).sum()
        if reference.sum() + tp + (~reference * F.softplus(z)).sum() / torch.log(torch.tensor(2.0)) <= 0:
            continue
        decision = z > 0
        dice = 2 * (decision & reference).sum() / (decision.sum() + reference.sum())
        assert score.item() <= dice.item() + 1e-6
        checked += 1
    assert checked >= 30


def test_calibrated_surrogate_is_quasi_concave_where_soft_dice_is_not():
    # quasi-concave: along any segment the score never falls below the lower of its two ends
    # (on the surrogate's domain, TP >= 0). Soft Dice fails this on the same kind of segments.
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, 2, (1, 1, 5, 4, 3), generator=generator)
    worst = {}
    for calibrated in (True, False):
        loss = SoftDiceLoss(calibrated_surrogate=calibrated, smooth_nr=0, smooth_dr=0)
        dips = []
        sign = (2 * target - 1).double().expand(1, 2, 5, 4, 3) * torch.tensor([-1.0, 1.0], dtype=torch.float64).view(1, 2, 1, 1, 1)
        for _ in range(200):
            a, b = (sign + 3 * torch.randn(1, 2, 5, 4, 3, generator=generator, dtype=torch.float64) for _ in range(2))
            ends = [loss.scores(a, target).item(), loss.scores(b, target).item()]
            if min(ends) < 0:
                continue
            path = [loss.scores(a + t * (b - a), target).item() for t in torch.linspace(0, 1, 21).tolist()]
            dips.append(min(ends) - min(path))
        worst[calibrated] = max(dips)
    assert worst[True] <= 1e-9
    assert worst[False] > 1e-3


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_focal_with_gamma_zero_is_cross_entropy(num_classes, soft):
    logits, target = random_case(num_classes)
    if soft:
        target = soft_target(num_classes)
    weight = torch.linspace(0.5, 2.0, num_classes)
    ce = CrossEntropyLoss(weight.tolist())(logits, target)
    # the general path, with an explicit per-class exponent 0
    general = focal_cross_entropy(logits, target, gamma=torch.zeros(num_classes), weight=weight)
    assert ce.item() == pytest.approx(general.item(), rel=1e-5)


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_focal_equals_monai(num_classes, gamma, alpha, soft):
    logits, target = random_case(num_classes)
    target = soft_target(num_classes) if soft else one_hot(target, num_classes)
    weight = None if alpha is None else [1 - alpha] + [alpha] * (num_classes - 1)  # MONAI's scalar alpha
    ours, grad_ours = value_and_gradient(CrossEntropyLoss(weight, gamma=gamma), logits, target)
    # MONAI averages over classes too: sum over classes, mean over voxels is ours
    theirs = FocalLoss(gamma=gamma, alpha=alpha, use_softmax=True, reduction="none")(logits, target).sum(1).mean()
    grad_theirs, = torch.autograd.grad(theirs, logits)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-4, atol=1e-7)


def test_cross_entropy_with_weights_is_the_voxel_mean():
    logits, target = random_case(3)
    weight = [0.2, 1.0, 3.0]
    per_voxel = F.cross_entropy(logits, target[:, 0], weight=torch.tensor(weight), reduction="none")
    assert CrossEntropyLoss(weight)(logits, target).item() == pytest.approx(per_voxel.mean().item(), rel=1e-6)
    # so a label map and its one-hot encoding agree (F.cross_entropy's weighted mean does not)
    assert CrossEntropyLoss(weight)(logits, one_hot(target, 3)).item() == pytest.approx(per_voxel.mean().item(), rel=1e-6)


def test_focal_gradient_is_finite_for_saturated_predictions():
    _, target = random_case(3)
    logits = perfect_logits(target, 3, scale=200.0).requires_grad_()  # p rounds to exactly 1
    for loss in (CrossEntropyLoss(gamma=0.5), UnifiedFocalLoss()):
        value, gradient = value_and_gradient(loss, logits, target)
        assert torch.isfinite(value) and torch.isfinite(gradient).all()


# --- Unified Focal loss -----------------------------------------------------------------
def authors_asymmetric_unified_focal(probs, y, weight, delta, gamma, eps=1e-7):
    """Yeung et al.'s asymmetric formulas transcribed per class: background suppressed, every
    foreground class rare; weight on the focal cross-entropy as the paper (and MONAI)."""
    cross_entropy = -y * probs.log()
    focal_ce = torch.cat([(1 - delta) * (1 - probs[:, :1]) ** gamma * cross_entropy[:, :1],
                          delta * cross_entropy[:, 1:]], dim=1).sum(1).mean()
    axes = tuple(range(2, probs.ndim))
    tp = (y * probs).sum(axes)
    fn = (y * (1 - probs)).sum(axes)
    fp = ((1 - y) * probs).sum(axes)
    tversky = (tp + eps) / (tp + delta * fn + (1 - delta) * fp + eps)
    focal_tversky = torch.cat([1 - tversky[:, :1], (1 - tversky[:, 1:]) ** (1 - gamma)], dim=1).mean()
    return weight * focal_ce + (1 - weight) * focal_tversky


@pytest.mark.parametrize("num_classes", [2, 3, 4])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_unified_focal_equals_the_authors_formula(num_classes, soft):
    logits, target = random_case(num_classes)
    y = soft_target(num_classes) if soft else one_hot(target, num_classes)
    expected = authors_asymmetric_unified_focal(torch.softmax(logits, 1), y, weight=0.3, delta=0.6, gamma=0.4)
    ours = UnifiedFocalLoss(weight=0.3, delta=0.6, gamma=0.4, smooth=2e-7)(logits, y if soft else target)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("delta, gamma", [(0.6, 0.5), (0.7, 0.75)])
def test_unified_focal_terms_equal_monai_on_binary(delta, gamma):
    logits, target = random_case(2)
    probs, y = torch.softmax(logits, 1), one_hot(target, 2)  # MONAI applies no activation itself
    focal = UnifiedFocalLoss(weight=1.0, delta=delta, gamma=gamma)(logits, target)
    # MONAI's focal term is also averaged over the 2 classes: half the authors' (and ours)
    monai_focal = AsymmetricFocalLoss(delta=delta, gamma=gamma)(probs, y)
    assert focal.item() == pytest.approx(2 * monai_focal.item(), rel=1e-5)
    tversky = UnifiedFocalLoss(weight=0.0, delta=delta, gamma=gamma, smooth=2e-7)(logits, target)
    monai_tversky = AsymmetricFocalTverskyLoss(delta=delta, gamma=gamma, epsilon=1e-7)(probs, y)
    assert tversky.item() == pytest.approx(monai_tversky.item(), rel=1e-5)


# --- compound, target forms, validation -------------------------------------------------
@pytest.mark.parametrize("num_classes", [2, 3])
def test_ce_softdice_equals_monai_dicece(num_classes):
    logits, target = random_case(num_classes)
    ours = CompoundLoss({"ce": CrossEntropyLoss(), "softdice": SoftDiceLoss()}, {"ce": 0.7, "softdice": 1.3})
    theirs = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5,
                        smooth_dr=1e-5, lambda_ce=0.7, lambda_dice=1.3)
    assert ours(logits, target).item() == pytest.approx(theirs(logits, target).item(), rel=1e-5)


@pytest.mark.parametrize("loss", [SoftDiceLoss(), SoftDiceLoss(generalised="square", include_background=True),
                                  SoftDiceLoss(error_exponent=2), SoftDiceLoss(alpha=1, beta=1, soft_label=True),
                                  CrossEntropyLoss(), CrossEntropyLoss([0.5, 1, 2], gamma=2), UnifiedFocalLoss()])
def test_soft_targets_equal_one_hot_targets(loss):
    logits, target = random_case(3)
    assert loss(logits, one_hot(target, 3)).item() == pytest.approx(loss(logits, target).item(), rel=1e-6)


def test_bad_inputs_are_rejected():
    logits, target = random_case(3)
    with pytest.raises(ValueError, match="does not match"):
        SoftDiceLoss()(logits, target[:, :, :-1])
    with pytest.raises(ValueError, match="3 classes"):
        CrossEntropyLoss([1.0, 2.0])(logits, target)
    with pytest.raises(ValueError, match="unknown terms"):
        CompoundLoss({"ce": CrossEntropyLoss()}, {"dice": 1.0})
    with pytest.raises(ValueError, match="alpha == beta"):
        SoftDiceLoss(squared=True, alpha=0.3, beta=0.7)
    with pytest.raises(ValueError, match="error_exponent"):
        SoftDiceLoss(error_exponent=0.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        SoftDiceLoss(error_exponent=2, soft_label=True)
    with pytest.raises(ValueError, match="generalised"):
        SoftDiceLoss(generalised="inverse")
    with pytest.raises(ValueError, match="gamma"):
        UnifiedFocalLoss(gamma=1.0)


def test_one_vs_rest_log_odds_are_log_p_over_the_rest():
    from biasseg.losses.soft_dice import one_vs_rest_log_odds

    for classes in (2, 4):  # two classes take a shortcut (the other logit); more the log-sum-exp of the others
        logits = torch.randn(2, classes, 3, 4, 5, dtype=torch.float64) * 4
        p = torch.softmax(logits, 1)
        torch.testing.assert_close(one_vs_rest_log_odds(logits), torch.log(p) - torch.log(1 - p))
