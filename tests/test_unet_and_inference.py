"""The U-Net's shapes and checks, and whole-volume sliding-window inference."""

import pytest
import torch
import torchio as tio

from biasseg.errors import InputError
from lightning_modules import SlidingWindow, UNet3D, sliding_window_probabilities


def test_unet_shapes_and_deep_supervision():
    net = UNet3D(in_channels=2, num_classes=3, features=[4, 8, 16])
    x = torch.randn(2, 2, 16, 8, 12)
    assert net(x).shape == (2, 3, 16, 8, 12)
    net.deep_supervision = True
    shapes = [tuple(o.shape) for o in net(x)]
    assert shapes == [(2, 3, 16, 8, 12), (2, 3, 8, 4, 6)]
    net.eval()
    assert net(x).shape == (2, 3, 16, 8, 12)  # inference returns full resolution only


def test_unet_rejects_indivisible_input():
    with pytest.raises(ValueError, match=r"divisible by \[4, 4, 4\]"):
        UNet3D(1, 2, [4, 8, 16])(torch.randn(1, 1, 10, 8, 8))


def test_per_axis_strides_and_kernels_shape_the_unet_as_a_thick_slice_plan():
    net = UNet3D(1, 2, [4, 8, 16], strides=[[2, 2, 1], [2, 2, 2]], kernel_sizes=[[3, 3, 1], [3, 3, 3], [3, 3, 3]])
    assert net.size_divisors == (4, 4, 2)
    assert net(torch.randn(1, 1, 8, 12, 6)).shape == (1, 2, 8, 12, 6)  # 6 slices: divisible by 2, not by 4
    assert net.encoder[0][0][0].kernel_size == (3, 3, 1) and net.encoder[1][0][0].stride == (2, 2, 1)
    assert net.upsamplers[-1].stride == (2, 2, 1)  # the last upsampler undoes the first stride
    with pytest.raises(ValueError, match="model.strides"):
        UNet3D(1, 2, [4, 8, 16], strides=[[2, 2, 3], [2, 2, 2]])


def channel_logits(x: torch.Tensor) -> torch.Tensor:
    """A 'network' whose probabilities are known per voxel: logits (x, -x)."""
    return torch.cat([x, -x], dim=1)


@pytest.mark.parametrize("weighting", ["hann", "gaussian", "constant"])
@pytest.mark.parametrize("shape", [(40, 36, 20), (10, 12, 7)])  # larger and smaller than the patch
def test_sliding_window_reproduces_a_voxelwise_model(weighting, shape):
    image = torch.randn(1, *shape)
    output = sliding_window_probabilities(image, channel_logits, (16, 16, 16), 0.5, 3, weighting)
    assert output.shape == (2, *shape)
    torch.testing.assert_close(output, torch.softmax(channel_logits(image[None])[0], 0), atol=1e-5, rtol=1e-5)


def test_sliding_window_blends_overlapping_patches():
    calls = []

    def predictor(patches):
        calls.append(len(patches))
        return torch.randn(len(patches), 2, *patches.shape[2:])

    probs = SlidingWindow((8, 8, 8), overlap=0.5, batch_size=4)(torch.zeros(1, 16, 16, 8), predictor)
    assert sum(calls) == 3 * 3 * 1  # stride 4 over 16 voxels: 3 positions per axis
    torch.testing.assert_close(probs.sum(0), torch.ones(16, 16, 8))


def test_sliding_window_settings_are_validated():
    with pytest.raises(ValueError, match="weighting"):
        SlidingWindow((8, 8, 8), weighting="triangle")
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindow((8, 8, 8), overlap=1.0)


def test_matches_torchio_grid_aggregator_with_hann_weighting():
    """Our device-side blending reproduces TorchIO's GridSampler + GridAggregator('hann')."""
    import torchio as tio

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 40, 36, 24, generator=generator)
    net = torch.nn.Conv3d(1, 3, kernel_size=3, padding=1)

    def predict(patches):
        return net(patches)

    ours = sliding_window_probabilities(image, predict, (16, 16, 16), overlap=0.5, batch_size=4, weighting="hann")
    sampler = tio.GridSampler(tio.Subject(image=tio.ScalarImage(tensor=image)), (16, 16, 16), (8, 8, 8))
    aggregator = tio.GridAggregator(sampler, overlap_mode="hann")
    with torch.no_grad():
        for batch in tio.SubjectsLoader(sampler, batch_size=4):
            probabilities = torch.softmax(predict(batch["image"][tio.DATA]), dim=1)
            aggregator.add_batch(probabilities, batch[tio.LOCATION])
    torch.testing.assert_close(ours, aggregator.get_output_tensor(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,patch,overlap", [((40, 33, 17), (16, 16, 8), (8, 8, 4)), ((16, 16, 16), (16, 16, 16), (8, 8, 8)),
                                                 ((97, 50, 31), (32, 24, 16), (0, 12, 8)), ((20, 21, 22), (8, 10, 12), (2, 4, 6))])
def test_our_grid_is_torchios_grid(shape, patch, overlap):
    """grid_locations against the locations of the patches TorchIO's (public) GridSampler yields."""
    from lightning_modules.sliding_window import grid_locations

    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.zeros(1, *shape)))
    theirs = sorted(tuple(int(v) for v in patch_[tio.LOCATION]) for patch_ in tio.GridSampler(subject, patch, overlap))
    assert [tuple(row) for row in grid_locations(shape, patch, overlap).tolist()] == theirs


def test_mirroring_averages_the_flipped_predictions():
    from lightning_modules.sliding_window import mirror_combinations, sliding_window_probabilities

    assert mirror_combinations([0, 2]) == [(), (2,), (4,), (2, 4)]
    image = torch.randn(1, 8, 6, 4)
    assert torch.allclose(sliding_window_probabilities(image, channel_logits, (8, 6, 4), mirror_axes=[0, 1, 2]),
                          sliding_window_probabilities(image, channel_logits, (8, 6, 4)), atol=1e-6)  # a voxelwise net: unchanged
    ramp = torch.linspace(-2, 2, 8).view(1, 1, 8, 1, 1)

    def position_dependent(patches: torch.Tensor) -> torch.Tensor:  # not flip-equivariant: mirroring symmetrises it
        return torch.cat([torch.zeros_like(patches), ramp.expand_as(patches)], dim=1)

    mirrored = sliding_window_probabilities(image, position_dependent, (8, 6, 4), weighting="constant", mirror_axes=[0])
    plain = torch.sigmoid(ramp[0, 0]).expand(8, 6, 4)
    assert torch.allclose(mirrored[1], (plain + plain.flip(0)) / 2, atol=1e-6)


@pytest.mark.parametrize("weighting", ["hann", "gaussian"])
def test_accumulating_on_the_cpu_gives_the_same_map(weighting):
    """The CPU fallback (accumulate=cpu; auto where the device cannot hold the map) sums the
    same blended patches in the same order: the same map to 1e-5, returned on the CPU."""
    torch.manual_seed(0)
    net = UNet3D(1, 3, [4, 8]).eval()
    image = torch.randn(1, 37, 30, 18)
    maps = {how: SlidingWindow((16, 16, 8), weighting=weighting, accumulate=how)(image, net)
            for how in ("device", "cpu", "auto")}
    for how in ("cpu", "auto"):
        assert maps[how].device.type == "cpu" and maps[how].shape == (3, 37, 30, 18)
        assert torch.allclose(maps[how], maps["device"], atol=1e-5, rtol=0)
    with pytest.raises(InputError, match=r"accumulate \(data.val_accumulate; accumulate= of predict.py\) must be one of"):
        SlidingWindow((16, 16, 8), accumulate="gpu")
