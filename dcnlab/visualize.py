"""Where the deformable layers of a model sample: learned sampling locations and masks, and plots of them.

Coordinates are in index units along each spatial dim, axis 0 first (t in 1D, (y, x) in 2D, (z, y, x) in 3D),
with position i at the centre of element i, as in the op contract: output position o of a layer samples kernel
point k at o * stride - padding + k * dilation + offset, in the coordinates of the layer's input.
`LayerSampling.to_input` maps those to the network input's by the cumulative stride in front of the layer
(x * input_stride). That is exact where every downsampling step centres its output on an input position
(strided convs and pools with odd kernels and padding k // 2: ResNet, DCNv3Net); after 2x2 pooling (U-Net) the
true centre lies (input_stride - 1) / 2 further on, less than one position of the layer's input.

`sampling_locations(model, x)` captures them with forward hooks; `plot_signal`, `plot_image` and `plot_volume`
(or `plot_sample`, which picks by dimension) draw them over 1D, 2D and 3D inputs; `visualize(config)` is
`python -m dcnlab visualize`.
"""

import fnmatch
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from torch.func import functional_call

from dcnlab.nn import DCNv3
from dcnlab.nn.deform_conv import DEFORM_CONVS
from dcnlab.runner import build, load_run_checkpoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFORMABLE_LAYERS: tuple[type[nn.Module], ...] = (*DEFORM_CONVS.values(), DCNv3)
DEFORMABLE_LAYER_NAMES = "dcnlab.nn DeformConv1d/2d/3d or DCNv3"
# Spatial size per dim of the shape-only probe that measures cumulative strides: 2**7 * 3**2 * 5 is divisible
# by every stride made of 2s (up to 128), 3s and 5s, so no map size is rounded.
PROBE_SIZE = 5760
SPLITS = ("train", "val", "test")
_STAGES = {"train": "fit", "val": "validate", "test": "test"}
MASK_COLORMAP = "plasma"


@dataclass
class LayerSampling:
    """Where one deformable layer sampled, for a batch of B inputs.

    Attributes:
        name: the layer's qualified module name in the model.
        locations: (B, G, K, *out, d) sampling points, regular grid + predicted offset, in the layer's input
            coordinates; G offset groups, K kernel points (row-major over the kernel dims), d spatial dims.
        grid: (K, *out, d) the points a plain convolution samples (offset 0).
        mask: (B, G, K, *out) the modulation of each point (ones for a layer without modulation).
        kernel_size, stride, padding, dilation: the layer's.
        input_size: spatial size of the layer's input.
        input_stride: per dim, network-input positions per position of the layer's input.
    """

    name: str
    locations: Tensor
    grid: Tensor
    mask: Tensor
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    input_size: tuple[int, ...]
    input_stride: tuple[float, ...] = ()

    @property
    def dims(self) -> int:
        return self.grid.shape[-1]

    @property
    def output_size(self) -> tuple[int, ...]:
        return tuple(self.grid.shape[1:-1])

    @property
    def offset_groups(self) -> int:
        return self.locations.shape[1]

    def to_input(self, points: Tensor) -> Tensor:
        """Points (..., d) in the layer's input coordinates -> the network input's."""
        return points * points.new_tensor(self.input_stride)


def deformable_layers(model: nn.Module, include: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The deformable layers of `model` by qualified name, in module order.

    Args:
        include: glob patterns over the names (``["layer4.*"]``, or one pattern as a string); None for all.
            Patterns that match none of the model's deformable layers raise a ValueError that lists them.
    """
    layers = {name: module for name, module in model.named_modules() if isinstance(module, DEFORMABLE_LAYERS)}
    if include is None or not layers:
        return layers
    patterns = [include] if isinstance(include, str) else list(include)
    chosen = {name: module for name, module in layers.items() if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    if not chosen:
        raise ValueError(f"layers: no deformable layer matches {patterns}; the model has {list(layers)}")
    return chosen


def _mesh(axes: Sequence[Tensor]) -> Tensor:
    """(*sizes, d): every combination of the 1-D `axes`, the last dim indexing the axis."""
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def regular_grid(
    output_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """(K, *output_size, d): o * stride - padding + k * dilation, where a plain convolution samples."""
    dims = len(output_size)
    kernel_points = _mesh([torch.arange(k) * d for k, d in zip(kernel_size, dilation, strict=True)])
    positions = _mesh([torch.arange(n) * s - p for n, s, p in zip(output_size, stride, padding, strict=True)])
    grid = kernel_points.reshape(-1, *(1,) * dims, dims) + positions
    return grid.float()


def _record(module: nn.Module, inputs: tuple[Tensor, ...], name: str, records: dict[str, LayerSampling]) -> None:
    input = inputs[0]
    dims = input.dim() - 2
    kernel_points = math.prod(module.kernel_size)
    # The layer's own predictor, run again on the input it was given: the op itself is left untouched.
    offset, mask = module.offsets_and_mask(input)
    output_size = tuple(offset.shape[2:])
    grid = regular_grid(output_size, module.kernel_size, module.stride, module.padding, module.dilation)
    offset = offset.detach().float().cpu().unflatten(1, (-1, kernel_points, dims)).movedim(3, -1)
    if mask is None:
        mask = offset.new_ones(offset.shape[:-1])
    else:
        mask = mask.detach().float().cpu().unflatten(1, (-1, kernel_points))
    records[name] = LayerSampling(
        name,
        grid + offset,
        grid,
        mask,
        tuple(module.kernel_size),
        tuple(module.stride),
        tuple(module.padding),
        tuple(module.dilation),
        tuple(input.shape[2:]),
    )


def _probe_input_sizes(model: nn.Module, input: Tensor, layers: dict[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    """Each layer's input size for a PROBE_SIZE^d network input, run on the meta device (shapes only, no data).

    Comparing sizes at the real input's size would be wrong where maps round up at stride-2 steps (a 16^3 volume
    is 1^3 at both stride 16 and stride 32). A model that cannot run on meta tensors gets an empty dict.
    """
    sizes: dict[str, tuple[int, ...]] = {}

    def record_size(name: str, inputs: tuple[Tensor, ...]) -> None:  # None: a hook's result replaces the output
        sizes[name] = tuple(inputs[0].shape[2:])

    handles = [
        module.register_forward_hook(lambda _, inputs, __, name=name: record_size(name, inputs))
        for name, module in layers.items()
    ]
    state = itertools.chain(model.named_parameters(), model.named_buffers())
    tensors = {name: torch.empty_like(t, device="meta") for name, t in state}
    probe = torch.empty(1, input.shape[1], *(PROBE_SIZE,) * (input.dim() - 2), dtype=input.dtype, device="meta")
    try:
        functional_call(model, tensors, (probe,))
    except (RuntimeError, NotImplementedError):
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return sizes


@torch.no_grad()
def sampling_locations(
    model: nn.Module, input: Tensor, layers: str | Sequence[str] | None = None
) -> dict[str, LayerSampling]:
    """Runs `model` once on `input` (B, C, *spatial) and returns where its deformable layers sampled.

    Forward hooks on the dcnlab.nn DeformConv1d/2d/3d and DCNv3 layers (those `layers` selects, see
    `deformable_layers`) capture each layer's offsets and masks; the result maps layer names, in the order
    the layers ran, to `LayerSampling`s with their cumulative stride filled in. A layer that runs several
    times in one forward keeps its last call. The model runs in its current mode: call `.eval()` first for
    inference behaviour (BatchNorm statistics, dropout).
    """
    chosen = deformable_layers(model, layers)
    if not chosen:
        raise ValueError(f"model: {type(model).__name__} has no deformable layers ({DEFORMABLE_LAYER_NAMES})")
    records: dict[str, LayerSampling] = {}
    handles = [
        module.register_forward_hook(lambda module, inputs, _, name=name: _record(module, inputs, name, records))
        for name, module in chosen.items()
    ]
    try:
        model(input)
    finally:
        for handle in handles:
            handle.remove()
    probed = _probe_input_sizes(model, input, chosen)
    for name, record in records.items():
        network_size, layer_size = (
            ((PROBE_SIZE,) * record.dims, probed[name])
            if name in probed
            else (tuple(input.shape[2:]), record.input_size)
        )
        record.input_stride = tuple(full / part for full, part in zip(network_size, layer_size, strict=True))
    return records


def query_positions(
    sampling: LayerSampling, query_grid: int = 3, queries: Sequence[Sequence[float] | float] | None = None
) -> list[tuple[int, ...]]:
    """Output positions of the layer to draw.

    Args:
        query_grid: without `queries`, this many positions evenly spread along each dim (fewer where the layer's
            output is smaller), all their combinations.
        queries: points in network-input coordinates, d numbers each (or plain numbers in 1D); each gives the
            output position whose kernel centre lies nearest to it (duplicates dropped).
    """
    if queries is None:
        if query_grid < 1:
            raise ValueError(f"query_grid: expected a positive number of positions per dim, got {query_grid}")
        axes = []
        for size in sampling.output_size:
            count = min(query_grid, size)
            axes.append(sorted({int((i + 0.5) * size / count) for i in range(count)}))
        return list(itertools.product(*axes))
    centres = sampling.to_input(sampling.grid.mean(dim=0))
    flat = centres.reshape(-1, sampling.dims)
    positions: list[tuple[int, ...]] = []
    for query in queries:
        point = [query] if isinstance(query, int | float) else list(query)
        if len(point) != sampling.dims or not all(isinstance(x, int | float) for x in point):
            raise ValueError(f"queries: expected points of {sampling.dims} numbers, got {query!r}")
        nearest = int((flat - flat.new_tensor(point)).norm(dim=1).argmin())
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(nearest), sampling.output_size))
        if position not in positions:
            positions.append(position)
    return positions


@dataclass
class _QueryPoints:
    """One output position's K points in network-input coordinates."""

    centre: Tensor  # (d,) centre of the regular kernel
    regular: Tensor  # (K, d)
    sampled: Tensor  # (K, d)
    mask: Tensor  # (K,)


def _query_points(sampling: LayerSampling, index: int, group: int, position: tuple[int, ...]) -> _QueryPoints:
    regular = sampling.to_input(sampling.grid[(slice(None), *position)])
    sampled = sampling.to_input(sampling.locations[(index, group, slice(None), *position)])
    return _QueryPoints(regular.mean(dim=0), regular, sampled, sampling.mask[(index, group, slice(None), *position)])


def _check_group(samplings: Sequence[LayerSampling], offset_group: int) -> None:
    for sampling in samplings:
        if not 0 <= offset_group < sampling.offset_groups:
            raise ValueError(
                f"offset_group: expected 0..{sampling.offset_groups - 1} (layer {sampling.name} has "
                f"{sampling.offset_groups} offset groups), got {offset_group}"
            )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _mask_norm(samplings: Sequence[LayerSampling], index: int, offset_group: int):
    from matplotlib.colors import Normalize

    highest = max(float(s.mask[index, offset_group].max()) for s in samplings)
    return Normalize(0.0, max(highest, 1e-6))


def _finish(figure, axes, norm, title: str | None, handles: list) -> None:
    from matplotlib.cm import ScalarMappable

    figure.colorbar(ScalarMappable(norm, MASK_COLORMAP), ax=axes, label="mask (colour and size)", shrink=0.8)
    columns = len(handles) if figure.get_figwidth() >= 9 else 2
    figure.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize="small")
    if title:
        figure.suptitle(title)


def _legend(regular_marker: str = "+", depth_note: str | None = None) -> list:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="x", color="red", label="query position"),
        Line2D([], [], ls="", marker=regular_marker, color="tab:cyan", label="regular grid (plain conv)"),
        Line2D([], [], ls="", marker="o", color="tab:orange", markeredgecolor="k", label="sampling point"),
    ]
    if depth_note:
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="tab:orange", label=depth_note))
    return handles


def _sizes(mask: Tensor, norm) -> Tensor:
    return 6 + 34 * mask.clamp(min=0) / norm.vmax


def plot_signal(
    signal: Tensor,
    samplings: Sequence[LayerSampling],
    index: int = 0,
    *,
    query_grid: int = 3,
    queries: Sequence[Sequence[float] | float] | None = None,
    offset_group: int = 0,
    title: str | None = None,
) -> "Figure":
    """A figure with one panel per layer: the signal (C, L) on top, one row per query position below it with
    the K sampling points (colour and size: mask) under their regular-grid points, lines joining each pair.

    `index` picks the sample of the batch in `samplings`; the other arguments are `query_positions`' and the
    offset group drawn. The grey bands are outside the signal, where the op reads zeros.
    """
    plt = _pyplot()
    from matplotlib.collections import LineCollection

    _check_group(samplings, offset_group)
    norm = _mask_norm(samplings, index, offset_group)
    rows = [query_positions(s, query_grid, queries) for s in samplings]
    length = signal.shape[-1]
    figure, axes = plt.subplots(
        len(samplings), 1, figsize=(11, sum(1.6 + 0.35 * len(r) for r in rows)), squeeze=False, layout="constrained"
    )
    low, high = signal.min(), signal.max()
    scaled = (signal - low) / (high - low).clamp(min=1e-12)
    for ax, sampling, positions in zip(axes[:, 0], samplings, rows, strict=True):
        for channel in scaled:
            ax.plot(torch.arange(length), 0.6 + channel, color="0.25", lw=0.8)
        extent = [-0.5, length - 0.5]
        ticks, labels = [1.1], ["signal"]
        for row, position in enumerate(positions):
            points = _query_points(sampling, index, offset_group, position)
            level = -row
            regular, sampled = points.regular[:, 0], points.sampled[:, 0]
            extent += [float(sampled.min()), float(sampled.max()), float(regular.min()), float(regular.max())]
            starts = torch.stack([regular, torch.full_like(regular, level + 0.3)], dim=-1)
            ends = torch.stack([sampled, torch.full_like(sampled, level)], dim=-1)
            ax.add_collection(LineCollection(torch.stack([starts, ends], dim=1).numpy(), colors="0.6", lw=0.6))
            ax.scatter(regular, torch.full_like(regular, level + 0.3), marker="|", color="tab:cyan", s=40, zorder=4)
            ax.scatter(
                sampled,
                torch.full_like(sampled, level),
                c=points.mask,
                cmap=MASK_COLORMAP,
                norm=norm,
                s=_sizes(points.mask, norm),
                edgecolors="k",
                linewidths=0.3,
                zorder=3,
            )
            ax.scatter([points.centre[0]], [level + 0.3], marker="x", color="red", s=40, zorder=4)
            ax.axvline(float(points.centre[0]), color="red", alpha=0.15, lw=0.8)
            ticks.append(level)
            labels.append(f"t={float(points.centre[0]):g}")
        margin = 0.02 * (max(extent) - min(extent)) + 1
        left, right = min(extent) - margin, max(extent) + margin
        ax.axvspan(left, -0.5, color="0.9", zorder=0)
        ax.axvspan(length - 0.5, right, color="0.9", zorder=0)
        ax.set_xlim(left, right)
        ax.set_ylim(-len(positions) + 0.5, 1.8)
        ax.set_yticks(ticks, labels, fontsize="small")
        ax.set_title(_layer_title(sampling), fontsize="medium", loc="left")
    axes[-1, 0].set_xlabel("t (input positions)")
    _finish(figure, axes[:, 0].tolist(), norm, title, _legend("|"))
    return figure


def _layer_title(sampling: LayerSampling) -> str:
    stride = "x".join(f"{s:g}" for s in sampling.input_stride)
    kernel = "x".join(str(k) for k in sampling.kernel_size)
    return f"{sampling.name}: kernel {kernel}, input stride {stride}, output {tuple(sampling.output_size)}"


def _show_image(ax, image: Tensor) -> None:
    """(C, H, W), pixel (i, j) centred on (x=j, y=i): RGB for 3 channels, else the channel mean in grey."""
    if image.shape[0] == 3:
        low, high = image.min(), image.max()
        ax.imshow(((image - low) / (high - low).clamp(min=1e-12)).permute(1, 2, 0).numpy())
    else:
        ax.imshow(image.mean(dim=0).numpy(), cmap="gray")


def _draw_points(ax, points: _QueryPoints, norm, slab: tuple[float, float] | None = None) -> list[Tensor]:
    """Draws one query's points projected on (y, x), the last two coordinates; returns them, for the axis limits.

    slab: (depth, tolerance) in 3D: points whose first coordinate is within the tolerance of the depth are on
    the slice: sampling points there are filled, the others hollow; only regular-grid points on it are drawn.
    """
    from matplotlib.collections import LineCollection

    regular, sampled = points.regular[:, -2:], points.sampled[:, -2:]
    if slab is None:
        on_slice = regular_on_slice = torch.ones(len(sampled), dtype=torch.bool)
    else:
        depth, tolerance = slab
        on_slice = (points.sampled[:, 0] - depth).abs() <= tolerance
        regular_on_slice = (points.regular[:, 0] - depth).abs() <= tolerance
    segments = torch.stack([regular.flip(-1), sampled.flip(-1)], dim=1)[on_slice | regular_on_slice]
    ax.add_collection(LineCollection(segments.numpy(), colors="tab:cyan", linewidths=0.6, alpha=0.6))
    ax.scatter(
        regular[regular_on_slice, 1],
        regular[regular_on_slice, 0],
        marker="+",
        color="tab:cyan",
        s=25,
        linewidths=0.8,
        zorder=4,
    )
    sizes = _sizes(points.mask, norm)
    ax.scatter(
        sampled[on_slice, 1],
        sampled[on_slice, 0],
        c=points.mask[on_slice],
        cmap=MASK_COLORMAP,
        norm=norm,
        s=sizes[on_slice],
        edgecolors="k",
        linewidths=0.3,
        zorder=3,
    )
    if not on_slice.all():
        colours = _pyplot().get_cmap(MASK_COLORMAP)(norm(points.mask[~on_slice].numpy()))
        ax.scatter(
            sampled[~on_slice, 1], sampled[~on_slice, 0], facecolors="none", edgecolors=colours, s=sizes[~on_slice]
        )
    ax.scatter([points.centre[-1]], [points.centre[-2]], marker="x", color="red", s=45, zorder=5)
    return [regular, sampled]


def _fit_view(ax, drawn: list[Tensor], height: int, width: int) -> None:
    """Limits that show the image and every point; a dashed frame marks the image edge (zeros beyond)."""
    from matplotlib.patches import Rectangle

    points = torch.cat([*drawn, torch.tensor([[-0.5, -0.5], [height - 0.5, width - 0.5]])])
    low, high = points.min(dim=0).values, points.max(dim=0).values
    margin = 0.03 * (high - low).max() + 0.5
    ax.set_xlim(float(low[1] - margin), float(high[1] + margin))
    ax.set_ylim(float(high[0] + margin), float(low[0] - margin))
    ax.add_patch(Rectangle((-0.5, -0.5), width, height, fill=False, ls="--", lw=0.8, edgecolor="0.5"))
    ax.set_facecolor("0.92")


def plot_image(
    image: Tensor,
    samplings: Sequence[LayerSampling],
    index: int = 0,
    *,
    query_grid: int = 3,
    queries: Sequence[Sequence[float] | float] | None = None,
    offset_group: int = 0,
    title: str | None = None,
) -> "Figure":
    """A figure with one panel per layer over the image (C, H, W): per query position (red x) the regular-grid
    points (cyan +) and the K sampling points (colour and size: mask), lines joining each pair.

    `index` picks the sample of the batch in `samplings`; the other arguments are `query_positions`' and the
    offset group drawn. The dashed frame is the image edge: points beyond it read zeros.
    """
    plt = _pyplot()
    _check_group(samplings, offset_group)
    norm = _mask_norm(samplings, index, offset_group)
    columns = min(len(samplings), 3)
    rows = math.ceil(len(samplings) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns + 1, 4.2 * rows + 0.8), squeeze=False, layout="constrained"
    )
    height, width = image.shape[-2:]
    for ax, sampling in zip(axes.flat, samplings, strict=False):
        _show_image(ax, image)
        drawn = []
        for position in query_positions(sampling, query_grid, queries):
            drawn += _draw_points(ax, _query_points(sampling, index, offset_group, position), norm)
        _fit_view(ax, drawn, height, width)
        ax.set_title(_layer_title(sampling).replace(": ", "\n", 1), fontsize="small")
    for ax in axes.flat[len(samplings) :]:
        ax.set_axis_off()
    _finish(figure, axes.ravel().tolist(), norm, title, _legend())
    return figure


def plot_volume(
    volume: Tensor,
    samplings: Sequence[LayerSampling],
    index: int = 0,
    *,
    query_grid: int = 3,
    queries: Sequence[Sequence[float] | float] | None = None,
    offset_group: int = 0,
    title: str | None = None,
) -> "Figure":
    """A figure with one row per layer and one panel per depth of its query positions: the axial slice (C, H, W)
    of the volume (C, D, H, W) through the queries' kernel centre, their points projected onto it.

    Sampling points within half a regular-grid step in depth of the slice are filled, the others hollow (they
    lie on other slices and are drawn projected); the regular-grid points shown are those on the slice.
    """
    plt = _pyplot()
    _check_group(samplings, offset_group)
    norm = _mask_norm(samplings, index, offset_group)
    depth, height, width = volume.shape[-3:]
    layouts = []
    for sampling in samplings:
        by_depth: dict[int, list[_QueryPoints]] = {}
        for position in query_positions(sampling, query_grid, queries):
            by_depth.setdefault(position[0], []).append(_query_points(sampling, index, offset_group, position))
        layouts.append((sampling, by_depth))
    columns = max(len(by_depth) for _, by_depth in layouts)
    figure, axes = plt.subplots(
        len(samplings),
        columns,
        figsize=(3.8 * columns + 1, 3.8 * len(samplings) + 0.8),
        squeeze=False,
        layout="constrained",
    )
    for row, (sampling, by_depth) in enumerate(layouts):
        # Half the spacing of the regular grid in depth, in input positions.
        tolerance = 0.5 * sampling.dilation[0] * sampling.input_stride[0]
        for column, queries_at_depth in enumerate(by_depth.values()):
            ax = axes[row, column]
            centre = float(queries_at_depth[0].centre[0])
            z = min(max(round(centre), 0), depth - 1)
            _show_image(ax, volume[:, z])
            drawn = []
            for points in queries_at_depth:
                drawn += _draw_points(ax, points, norm, (z, tolerance))
            _fit_view(ax, drawn, height, width)
            label = f"{sampling.name}\n" if column == 0 else "\n"
            ax.set_title(f"{label}axial slice z={z} (filled: |dz| <= {tolerance:g})", fontsize="small")
        for ax in axes[row, len(by_depth) :]:
            ax.set_axis_off()
        axes[row, 0].set_ylabel(_layer_title(sampling).split(": ", 1)[1], fontsize="x-small")
    handles = _legend(depth_note="sampling point on another slice (projected)")
    _finish(figure, axes.ravel().tolist(), norm, title, handles)
    return figure


PLOTS = {1: plot_signal, 2: plot_image, 3: plot_volume}


def plot_sample(input: Tensor, samplings: Sequence[LayerSampling], index: int = 0, **options) -> "Figure":
    """`plot_signal`, `plot_image` or `plot_volume` by the dimension of `input` (C, *spatial), one sample."""
    dims = input.dim() - 1
    if dims not in PLOTS:
        raise ValueError(f"input: expected (C, *spatial) with 1, 2 or 3 spatial dims, got shape {tuple(input.shape)}")
    return PLOTS[dims](input.detach().float().cpu(), samplings, index, **options)


def default_output_dir(checkpoint_path: Path) -> Path:
    """The `visualize/` folder of the checkpoint's run (next to its checkpoints/ folder)."""
    parent = checkpoint_path.parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "visualize"


def _sample_indices(samples: int | Sequence[int], size: int, split: str) -> list[int]:
    if isinstance(samples, int) and not isinstance(samples, bool):
        if samples < 1:
            raise ValueError(f"samples: expected a positive count or a list of indices, got {samples}")
        return list(range(min(samples, size)))
    indices = list(samples) if isinstance(samples, Sequence) and not isinstance(samples, str) else None
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        raise ValueError(f"samples: expected a positive count or a list of indices, got {samples!r}")
    outside = [i for i in indices if not 0 <= i < size]
    if outside:
        raise ValueError(f"samples: indices {outside} are outside the {split} split (0..{size - 1})")
    return indices


def visualize(config: DictConfig) -> Path:
    """Draws the sampling locations of a checkpoint's deformable layers over samples of a split; returns the folder.

    The data, model and task come from the config saved in the checkpoint (with config's data/model/task on
    top, as in `evaluate`). Writes `{split}_sample{index:04d}.png` per sample into config.output_dir, or into
    `default_output_dir(ckpt_path)` when that is null.
    """
    if config.split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {config.split!r}")
    checkpoint_path, checkpoint, run_config = load_run_checkpoint(config)
    datamodule, task = build(run_config)
    task.load_state_dict(checkpoint["state_dict"])
    if not deformable_layers(task.model):
        raise ValueError(
            f"ckpt_path: the model of {checkpoint_path} has no deformable layers ({DEFORMABLE_LAYER_NAMES}) "
            "to visualize; was it trained with model.deformable=false?"
        )
    layers = OmegaConf.to_object(config.layers) if isinstance(config.layers, ListConfig) else config.layers
    deformable_layers(task.model, layers)  # a pattern that matches nothing fails before the data is loaded
    queries = OmegaConf.to_object(config.queries) if config.queries is not None else None

    datamodule.prepare_data()
    datamodule.setup(_STAGES[config.split])
    dataset = getattr(datamodule, f"{config.split}_dataloader")().dataset
    samples = OmegaConf.to_object(config.samples) if isinstance(config.samples, ListConfig) else config.samples
    indices = _sample_indices(samples, len(dataset), config.split)
    items = [dataset[i] for i in indices]
    device = torch.device(config.device)
    task = task.to(device).eval()
    inputs = torch.stack([torch.as_tensor(item[0]) for item in items]).to(device)
    with torch.no_grad():
        predictions = task.predictions(task(inputs)).cpu()
    samplings = list(sampling_locations(task.model, inputs, layers).values())

    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir(checkpoint_path)
    output_dir.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    for batch_index, (sample, (_, target)) in enumerate(zip(indices, items, strict=True)):
        title = f"{config.split} sample {sample}"
        if torch.as_tensor(target).dim() == 0:
            title += f": label {int(target)}, predicted {int(predictions[batch_index])}"
        figure = plot_sample(
            inputs[batch_index],
            samplings,
            batch_index,
            query_grid=config.query_grid,
            queries=queries,
            offset_group=config.offset_group,
            title=title,
        )
        figure.savefig(output_dir / f"{config.split}_sample{sample:04d}.png", dpi=110)
        plt.close(figure)
    print(
        f"dcnlab: sampling locations of {len(samplings)} deformable layer(s) for {len(indices)} {config.split} "
        f"sample(s) in {output_dir.resolve()} ({config.split}_sampleNNNN.png)"
    )
    return output_dir
