"""dcnlab.models.dcnv3net.DCNv3Net and its plain twin, in 1D, 2D and 3D."""

import pytest
import torch

from dcnlab.models.dcnv3net import DCNv3Net
from dcnlab.nn import DCNv3

INPUTS = {1: (2, 2, 64), 2: (2, 3, 32, 32), 3: (1, 1, 16, 16, 16)}


def _net(dim, deformable=True):
    torch.manual_seed(0)
    return DCNv3Net(
        dim=dim,
        in_channels=INPUTS[dim][1],
        num_classes=5,
        channels=16,
        depths=(1, 1, 2, 1),
        group_channels=8,
        deformable=deformable,
    )


@pytest.mark.parametrize("deformable", [True, False])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_logits_and_stage_shapes(dim, deformable):
    net = _net(dim, deformable)
    x = torch.randn(INPUTS[dim])
    assert net(x).shape == (INPUTS[dim][0], 5)
    features = net.forward_features(x)
    assert [f.shape[1] for f in features] == [16, 32, 64, 128]
    assert features[0].shape[2:] == tuple(s // 4 for s in INPUTS[dim][2:])


def test_the_twin_flag_swaps_every_dcnv3_for_a_depthwise_conv():
    deformable, plain = _net(2, True), _net(2, False)
    assert sum(isinstance(m, DCNv3) for m in deformable.modules()) == 5
    assert not any(isinstance(m, DCNv3) for m in plain.modules())
    offset_params = sum(
        p.numel() for n, p in deformable.named_parameters() if ".mixer.offset" in n or ".mixer.mask" in n
    )
    assert offset_params > 0


def test_training_step_reaches_the_offset_predictors():
    net = _net(2)
    loss = torch.nn.functional.cross_entropy(net(torch.randn(INPUTS[2])), torch.tensor([1, 3]))
    loss.backward()
    grads = [p.grad.abs().sum() for n, p in net.named_parameters() if n.endswith("mixer.offset.weight")]
    assert grads and all(g > 0 for g in grads)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="^dim: expected 1, 2 or 3"):
        DCNv3Net(dim=4)
    with pytest.raises(ValueError, match="^group_channels: expected a divisor of channels=64"):
        DCNv3Net(group_channels=24)
