"""dcnlab.models: N-D ResNet-DCN and U-Net-DCN shapes, their plain-conv twins, DCN placement, learning."""

import io

import pytest
import torch
import torchvision
from torch import nn

from dcnlab.models import MODELS, DCNv3Net, ResNetDCN, UNetDCN, create_model
from dcnlab.nn import DeformConv1d, DeformConv2d, DeformConv3d

SIZES = {1: (64,), 2: (32, 32), 3: (16, 16, 16)}
NAMES = ["resnet18", "resnet50", "unet"]
DEFORM_CONVS = (DeformConv1d, DeformConv2d, DeformConv3d)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(name: str, dim: int, **kwargs) -> nn.Module:
    """A fast instance of `name`: narrow layers, 3 input channels, 5 classes."""
    torch.manual_seed(0)
    return create_model(name, dim=dim, in_channels=3, num_classes=5, **_width_kwargs(name), **kwargs)


def _width_kwargs(name: str) -> dict:
    return {"base_channels": 8, "depth": 3} if name == "unet" else {"base_width": 8}


def _input(dim: int, dtype: torch.dtype = torch.float32, size: tuple[int, ...] | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, *(size or SIZES[dim]), generator=generator, dtype=dtype)


def _deformable_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, DEFORM_CONVS)]


def _randomise_offset_predictors(model: nn.Module, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".conv_offset." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_output_shapes(name, dim):
    model = _tiny(name, dim)
    x = _input(dim)
    output = model(x)
    if name == "unet":
        assert output.shape == (2, 5, *SIZES[dim])
        return
    assert output.shape == (2, 5)
    features = model.forward_features(x)
    expansion = 4 if name == "resnet50" else 1
    # Stage i runs at 1 / 2**(i + 2) of the input (stem /4), never below 1.
    expected = [
        (2, 8 * 2**stage * expansion, *(max(size // 2 ** (stage + 2), 1) for size in SIZES[dim])) for stage in range(4)
    ]
    assert [tuple(feature.shape) for feature in features] == expected
    assert model.stage_channels == [shape[1] for shape in expected]


@pytest.mark.parametrize("size", [(37, 29), (8, 9), (1, 3)])
@pytest.mark.parametrize("upsampling", ["transposed", "interpolate"])
def test_unet_output_keeps_any_input_size(size, upsampling):
    model = _tiny("unet", 2, upsampling=upsampling)
    assert model(_input(2, size=size)).shape == (2, 5, *size)


def test_unet_rejects_input_with_wrong_number_of_spatial_dims():
    with pytest.raises(ValueError, match=r"x: expected \(B, C, \*spatial\) with 2 spatial dims"):
        _tiny("unet", 2)(_input(3))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_plain_twin_has_the_same_parameters_apart_from_offset_predictors(name, dim):
    deformable, plain = _tiny(name, dim), _tiny(name, dim, deformable=False)
    assert _deformable_names(deformable) and not _deformable_names(plain)
    deformable_shapes = {k: v.shape for k, v in deformable.state_dict().items() if ".conv_offset." not in k}
    assert deformable_shapes == {k: v.shape for k, v in plain.state_dict().items()}
    offset_parameters = sum(p.numel() for n, p in deformable.named_parameters() if ".conv_offset." in n)
    assert offset_parameters > 0
    assert sum(p.numel() for p in deformable.parameters()) - offset_parameters == sum(
        p.numel() for p in plain.parameters()
    )


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_deformable_model_at_init_computes_its_plain_twin(name, dim):
    plain = _tiny(name, dim, deformable=False).double()
    x = _input(dim, torch.float64)
    with torch.no_grad():
        plain(x)  # train-mode pass: non-trivial BatchNorm running statistics for the eval comparison
    deformable = _tiny(name, dim).double()
    missing, unexpected = deformable.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".conv_offset." in key for key in missing)
    plain.eval()
    deformable.eval()
    with torch.no_grad():
        torch.testing.assert_close(deformable(x), plain(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_matches_torchvision_layout_and_output(depth):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(num_classes=10).double().eval()
    model = ResNetDCN(depth, dim=2, num_classes=10).double().eval()
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and missing and all(".conv_offset." in key for key in missing)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_dcn_stages_place_deformable_convs_only_in_flagged_stages(name):
    blocks = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}[name]
    model = _tiny(name, 2, dcn_stages=(True, False, True, False))
    expected = [f"layer{stage}.{block}.conv2" for stage in (1, 3) for block in range(blocks[stage - 1])]
    assert _deformable_names(model) == expected
    assert _deformable_names(_tiny(name, 2, dcn_stages=(True,) * 4, deformable=False)) == []


def test_dcn_levels_place_deformable_convs_only_at_chosen_levels():
    default = _tiny("unet", 2)
    assert default.dcn_levels == (1, 2)
    assert _deformable_names(default) == [
        f"{part}.{level}.{conv}" for part, level in [("encoders", 1), ("encoders", 2), ("decoders", 1)]
        for conv in ("conv1", "conv2")
    ]  # fmt: skip
    chosen = _tiny("unet", 2, dcn_levels=(0,))
    assert _deformable_names(chosen) == ["encoders.0.conv1", "encoders.0.conv2", "decoders.0.conv1", "decoders.0.conv2"]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", ["resnet18", "unet"])
def test_gradients_reach_offset_predictors(name, dim):
    model = _tiny(name, dim)
    model(_input(dim)).square().sum().backward()
    offset_convs = [module.conv_offset for module in model.modules() if isinstance(module, DEFORM_CONVS)]
    assert offset_convs
    for conv in offset_convs:
        # Rows up to G*K*d predict offsets, the rest mask logits: both must learn.
        offset_rows = conv.out_channels * dim // (dim + 1)
        assert conv.weight.grad[:offset_rows].abs().sum() > 0
        assert conv.weight.grad[offset_rows:].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_restores_outputs(name):
    model = _tiny(name, 2)
    _randomise_offset_predictors(model)
    x = _input(2)
    with torch.no_grad():
        model(x)  # moves the BatchNorm running statistics away from their init
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)
    restored = create_model(name, dim=2, in_channels=3, num_classes=5, **_width_kwargs(name))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


def test_zero_init_residual_zeroes_the_last_norm_of_every_block():
    model = ResNetDCN(50, dim=1, base_width=8, zero_init_residual=True)
    last_norms = [block.bn3 for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
    assert all(torch.count_nonzero(norm.weight) == 0 for norm in last_norms)
    assert torch.count_nonzero(model.layer1[0].bn2.weight) > 0


def test_create_model_knows_every_name_and_rejects_others():
    assert sorted(MODELS) == ["dcnv3net", "resnet18", "resnet34", "resnet50", "unet"]
    assert isinstance(create_model("resnet34", dim=1, base_width=8), ResNetDCN)
    assert isinstance(create_model("unet", dim=3), UNetDCN)
    assert isinstance(create_model("dcnv3net", dim=2, channels=16, depths=(1, 1, 1, 1)), DCNv3Net)
    with pytest.raises(
        ValueError, match=r"name: expected one of \['dcnv3net', 'resnet18', 'resnet34', 'resnet50', 'unet'\]"
    ):
        create_model("resnet101", dim=2)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ResNetDCN(101, dim=2), "depth: expected one of"),
        (lambda: ResNetDCN(18, dim=4), "dim: expected one of"),
        (lambda: ResNetDCN(18, dim=2, dcn_stages=(True,)), "dcn_stages: expected 4 flags"),
        (lambda: UNetDCN(dim=0), "dim: expected one of"),
        (lambda: UNetDCN(dim=2, depth=0), "depth: expected a positive"),
        (lambda: UNetDCN(dim=2, depth=3, dcn_levels=(3,)), r"dcn_levels: expected levels in 0..2"),
        (lambda: UNetDCN(dim=2, upsampling="nearest"), "upsampling: expected one of"),
    ],
)
def test_bad_constructor_arguments_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()
