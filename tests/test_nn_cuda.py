"""Layers and backbones on CUDA: same results as on the CPU, and AMP training steps."""

import pytest
import torch

from dcnlab.models import create_model
from dcnlab.nn import DCNv3, DeformConv3d

pytestmark = pytest.mark.gpu


def _randomise_predictors(model):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "conv_offset" in name or ".offset." in name or ".mask." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3)


@pytest.mark.parametrize("layer", ["deform_conv3d", "dcnv3"])
def test_layer_on_cuda_matches_cpu_in_float64(layer):
    torch.manual_seed(0)
    module = DeformConv3d(8, 8, 3, stride=2, padding=1, offset_groups=2) if layer == "deform_conv3d" else DCNv3(8, 2)
    module = module.double()
    _randomise_predictors(module)
    x = (
        torch.randn(2, 8, 6, 7, 5, dtype=torch.float64)
        if layer == "deform_conv3d"
        else torch.randn(2, 8, 9, 10).double()
    )
    expected = module(x)
    torch.testing.assert_close(module.cuda()(x.cuda()).cpu(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "name, dim, shape",
    [("resnet18", 2, (4, 3, 64, 64)), ("unet", 3, (2, 1, 16, 16, 16)), ("dcnv3net", 1, (4, 2, 128))],
)
def test_amp_training_step_on_cuda_lowers_the_loss(name, dim, shape, dtype):
    torch.manual_seed(0)
    kwargs = dict(base_width=16) if name.startswith("resnet") else dict(base_channels=8)
    if name == "dcnv3net":
        kwargs = dict(channels=16, depths=(1, 1, 1, 1), group_channels=8)
    classes = 3
    model = create_model(name, dim=dim, in_channels=shape[1], num_classes=classes, **kwargs).cuda()
    x = torch.randn(shape, device="cuda")
    target = (
        torch.randint(0, classes, (shape[0], *shape[2:]), device="cuda")
        if name == "unet"
        else torch.randint(0, classes, (shape[0],), device="cuda")
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    offset_grads = [p.grad for n, p in model.named_parameters() if "conv_offset" in n or ".offset." in n]
    assert offset_grads and all(g is not None and torch.isfinite(g).all() for g in offset_grads)
