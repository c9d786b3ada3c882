"""`python -m dcnlab visualize` and dcnlab.visualize: sampling locations captured from the deformable layers, PNGs."""

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from test_cli import TINY_DATA, _cli, _config
from torch import nn

from dcnlab.models import create_model
from dcnlab.nn import DeformConv2d, DeformConv3d
from dcnlab.runner import train
from dcnlab.visualize import deformable_layers, plot_volume, query_positions, sampling_locations, visualize

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = {"signals1d": 1, "shapes2d": 2, "volumes3d": 3}
PNG = b"\x89PNG"


def _visualize_config(overrides: list[str]):
    with initialize_config_module(version_base="1.3", config_module="dcnlab.conf"):
        return compose("visualize", overrides=overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-epoch tiny run per preset (trained on first use), by name; "plain" is shapes2d without DCN."""
    trained = {}

    def run(name: str):
        if name not in trained:
            path = tmp_path_factory.mktemp(name)
            preset = "shapes2d" if name == "plain" else name
            overrides = [f"experiment={preset}", "trainer.max_epochs=1", "test=false", "model.base_width=4"]
            if name == "plain":
                overrides.append("model.deformable=false")
            train(_config("train", path, [*overrides, *TINY_DATA, "callbacks.progress_bar=null"]))
            trained[name] = path
        return trained[name]

    return run


def _constant_shift_layer(shift: tuple[float, ...], **conv) -> DeformConv2d:
    """A DeformConv2d whose offset predictor outputs `shift` for every kernel point and a mask of 1 everywhere."""
    layer = DeformConv2d(1, 1, 3, **conv)
    with torch.no_grad():
        layer.conv_offset.weight.zero_()
        bias = layer.conv_offset.bias.view(-1)
        bias.zero_()  # mask logits 0: 2 * sigmoid(0) = 1
        bias[: layer.kernel_points * 2] = torch.tensor(shift).repeat(layer.kernel_points)
    return layer


def test_sampling_locations_are_the_regular_grid_plus_the_predicted_offset():
    shift = (0.5, -1.25)
    model = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), _constant_shift_layer(shift, stride=2, padding=1))
    (sampling,) = sampling_locations(model, torch.randn(2, 1, 16, 16)).values()

    assert sampling.name == "1" and sampling.output_size == (4, 4) and sampling.input_size == (8, 8)
    # Output (1, 2) of a stride-2, padding-1, 3x3 conv: rows 1*2-1+ky, columns 2*2-1+kx.
    expected = torch.tensor([[1.0 + ky, 3.0 + kx] for ky in range(3) for kx in range(3)])
    torch.testing.assert_close(sampling.grid[:, 1, 2], expected)
    torch.testing.assert_close(sampling.locations, (sampling.grid + torch.tensor(shift)).expand(2, 1, -1, -1, -1, -1))
    torch.testing.assert_close(sampling.mask, torch.ones(2, 1, 9, 4, 4))
    # The stride-2 conv in front: layer-input position p is network-input position 2p.
    assert sampling.input_stride == (2.0, 2.0)
    torch.testing.assert_close(sampling.to_input(sampling.locations), 2 * sampling.locations)


@pytest.mark.parametrize("layer_class", [DeformConv2d, DeformConv3d])
def test_layer_output_is_its_input_sampled_at_the_locations(layer_class):
    torch.manual_seed(0)
    dims = layer_class.dims
    layer = layer_class(1, 1, 3, stride=2, padding=1, bias=False)
    nn.init.normal_(layer.conv_offset.weight, std=0.5)  # offsets of a few positions, some pointing outside
    input = torch.randn(1, 1, *(7,) * dims)
    (sampling,) = sampling_locations(layer, input).values()
    # grid_sample with align_corners=True puts -1 and 1 on the first and last element centres and reads zeros
    # outside, as the op does; it takes coordinates last axis first.
    size = torch.tensor(input.shape[2:], dtype=torch.float32)
    for point in range(layer.kernel_points):
        with torch.no_grad():
            layer.weight.zero_()
            layer.weight.view(-1)[point] = 1.0
            output = layer(input)
        location = sampling.locations[:, 0, point]  # (1, *out, d)
        sampled = F.grid_sample(input, (2 * location / (size - 1) - 1).flip(-1), align_corners=True)
        torch.testing.assert_close(output, sampling.mask[:, :1, point] * sampled, atol=1e-5, rtol=1e-5)


def test_input_stride_counts_the_strides_that_rounded_map_sizes_hide():
    # A 16^3 volume is 1^3 both after stride 16 and after stride 32: the sizes alone cannot tell them apart.
    resnet = create_model("resnet18", dim=3, in_channels=1, num_classes=2, base_width=4).eval()
    samplings = sampling_locations(resnet, torch.randn(1, 1, 16, 16, 16))
    assert {name: s.input_stride for name, s in samplings.items()} == {
        "layer3.0.conv2": (16.0,) * 3,
        "layer3.1.conv2": (16.0,) * 3,
        "layer4.0.conv2": (32.0,) * 3,
        "layer4.1.conv2": (32.0,) * 3,
    }
    dcnv3 = create_model("dcnv3net", dim=2, in_channels=1, num_classes=2, channels=8, depths=[1] * 4, group_channels=8)
    samplings = sampling_locations(dcnv3.eval(), torch.randn(1, 1, 32, 32))
    assert [s.input_stride[0] for s in samplings.values()] == [4, 8, 16, 32]
    assert [s.offset_groups for s in samplings.values()] == [1, 2, 4, 8]  # DCNv3: one group per 8 channels


def test_layers_are_chosen_by_glob_and_a_pattern_matching_none_lists_them():
    model = create_model("resnet18", dim=2, in_channels=1, num_classes=2, base_width=4)
    assert list(deformable_layers(model, ["layer4.*"])) == ["layer4.0.conv2", "layer4.1.conv2"]
    assert list(deformable_layers(model, "layer3.1.conv2")) == ["layer3.1.conv2"]
    with pytest.raises(ValueError, match=r"layers: no deformable layer matches \['layer9\.\*'\].*layer3\.0\.conv2"):
        deformable_layers(model, ["layer9.*"])
    plain = create_model("resnet18", dim=2, in_channels=1, num_classes=2, base_width=4, deformable=False)
    with pytest.raises(ValueError, match="model: ResNetDCN has no deformable layers"):
        sampling_locations(plain, torch.randn(1, 1, 32, 32))


def test_query_positions_spread_over_the_output_or_snap_to_the_nearest_kernel_centre():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), _constant_shift_layer((0.0, 0.0), padding=1))
    (sampling,) = sampling_locations(model, torch.randn(1, 1, 16, 12)).values()  # output (8, 6), input stride 2
    assert query_positions(sampling, query_grid=3) == [(r, c) for r in (1, 4, 6) for c in (1, 3, 5)]
    assert query_positions(sampling, query_grid=10) == [(r, c) for r in range(8) for c in range(6)]
    # Kernel centres sit at 2 * (row, column) in input coordinates; (4.6, 4.8) and (4.2, 3.8) share the nearest.
    assert query_positions(sampling, queries=[[4.6, 4.8], [0, 100], [4.2, 3.8]]) == [(2, 2), (0, 5)]
    with pytest.raises(ValueError, match="queries: expected points of 2 numbers"):
        query_positions(sampling, queries=[[1.0]])


def test_volume_panels_are_the_axial_slices_through_each_query_depth():
    layer = DeformConv3d(1, 1, 3, stride=2, padding=1)
    volume = torch.randn(1, 1, 12, 12, 12)
    samplings = list(sampling_locations(layer, volume).values())
    figure = plot_volume(volume[0], samplings, query_grid=3)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    # Output depths 1, 3, 5 have kernel centres at depth 2, 6 and 10 of the volume.
    assert [title.rsplit("axial slice ", 1)[1].split(" ")[0] for title in titles] == ["z=2", "z=6", "z=10"]
    assert "|dz| <= 0.5" in titles[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_visualize_writes_one_png_per_sample_into_the_runs_visualize_folder(preset, runs):
    run = runs(preset)
    checkpoint = run / "checkpoints" / "last.ckpt"
    output_dir = visualize(_visualize_config([f"ckpt_path={checkpoint}", "samples=2", "query_grid=2"]))
    assert output_dir == run / "visualize"
    pngs = sorted(output_dir.glob("*.png"))
    assert [png.name for png in pngs] == ["test_sample0000.png", "test_sample0001.png"]
    assert all(png.read_bytes().startswith(PNG) for png in pngs)


def test_cli_draws_chosen_samples_and_layers_and_writes_nothing_in_the_working_dir(runs, tmp_path):
    checkpoint = runs("shapes2d") / "checkpoints" / "last.ckpt"
    work = tmp_path / "work"
    work.mkdir()
    output_dir = tmp_path / "pictures"
    options = ["split=val", "samples=[3,1]", "layers=[layer4.*]", "queries=[[4,4],[20,10]]", f"output_dir={output_dir}"]
    result = _cli("visualize", f"ckpt_path={checkpoint}", *options, cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"in {output_dir}" in result.stdout and "2 deformable layer(s) for 2 val sample(s)" in result.stdout
    assert sorted(p.name for p in output_dir.iterdir()) == ["val_sample0001.png", "val_sample0003.png"]
    assert not list(work.iterdir())


def test_plain_model_and_missing_checkpoint_give_one_line_errors(runs, tmp_path):
    checkpoint = runs("plain") / "checkpoints" / "last.ckpt"
    plain = _cli("visualize", f"ckpt_path={checkpoint}", cwd=tmp_path)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == (
        f"dcnlab visualize: ckpt_path: the model of {checkpoint} has no deformable layers "
        "(dcnlab.nn DeformConv1d/2d/3d or DCNv3) to visualize; was it trained with model.deformable=false?"
    )
    with pytest.raises(FileNotFoundError, match="ckpt_path: no checkpoint file at"):
        visualize(_visualize_config([f"ckpt_path={tmp_path}/none.ckpt"]))
