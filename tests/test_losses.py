"""Loss values and gradients, and equality with MONAI under matched options."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from losses import CompoundLoss, CrossEntropyLoss, SoftDiceLoss


def random_case(num_classes: int, batch: int = 3, shape=(6, 5, 4), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, *shape, generator=generator, requires_grad=True)
    target = torch.randint(0, num_classes, (batch, 1, *shape), generator=generator)
    return logits, target


def perfect_logits(target: torch.Tensor, num_classes: int, scale: float = 50.0) -> torch.Tensor:
    return scale * F.one_hot(target[:, 0], num_classes).movedim(-1, 1).float()


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
    # one image, 2 classes, 4 voxels: p(fg) = [0.9, 0.2, 0.5, 0.0]-ish via logits, y = [1, 0, 1, 0]
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


@pytest.mark.parametrize("loss", [SoftDiceLoss(), SoftDiceLoss(batch_dice=True), CrossEntropyLoss(),
                                  CompoundLoss({"ce": CrossEntropyLoss(), "dice": SoftDiceLoss()})])
def test_gradients_are_finite_and_nonzero(loss):
    logits, target = random_case(3)
    loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
def test_soft_dice_equals_monai(num_classes, batch, squared, include_background):
    logits, target = random_case(num_classes, seed=num_classes + 2 * batch)
    ours = SoftDiceLoss(batch_dice=batch, squared=squared, include_background=include_background,
                        smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    theirs = DiceLoss(include_background=include_background, to_onehot_y=True, softmax=True, batch=batch,
                      squared_pred=squared, smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    grad_ours, = torch.autograd.grad(ours, logits)
    grad_theirs, = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_soft_jaccard_equals_monai(num_classes):
    logits, target = random_case(num_classes)
    # MONAI's Jaccard is (2I + nr) / (2(S - I) + dr): ours with halved smoothing terms.
    ours = SoftDiceLoss(jaccard=True, smooth_nr=0.5, smooth_dr=0.5)(logits, target)
    theirs = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, jaccard=True,
                      smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_ce_softdice_equals_monai_dicece(num_classes):
    logits, target = random_case(num_classes)
    ours = CompoundLoss({"ce": CrossEntropyLoss(), "softdice": SoftDiceLoss()}, {"ce": 0.7, "softdice": 1.3})
    theirs = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5,
                        smooth_dr=1e-5, lambda_ce=0.7, lambda_dice=1.3)
    assert ours(logits, target).item() == pytest.approx(theirs(logits, target).item(), rel=1e-5)


def test_cross_entropy_matches_torch_with_weights():
    logits, target = random_case(3)
    weight = [0.2, 1.0, 3.0]
    expected = F.cross_entropy(logits, target[:, 0], weight=torch.tensor(weight))
    assert CrossEntropyLoss(weight)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_soft_targets_equal_one_hot_targets():
    logits, target = random_case(3)
    one_hot = F.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    for loss in (SoftDiceLoss(), CrossEntropyLoss()):
        assert loss(logits, one_hot).item() == pytest.approx(loss(logits, target).item(), rel=1e-6)


def test_bad_inputs_are_rejected():
    logits, target = random_case(3)
    with pytest.raises(ValueError, match="does not match"):
        SoftDiceLoss()(logits, target[:, :, :-1])
    with pytest.raises(ValueError, match="3 classes"):
        CrossEntropyLoss([1.0, 2.0])(logits, target)
    with pytest.raises(ValueError, match="unknown terms"):
        CompoundLoss({"ce": CrossEntropyLoss()}, {"dice": 1.0})
