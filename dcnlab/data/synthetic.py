"""Synthetic 1D/2D/3D datasets whose classes differ by shape under random geometric deformation.

The class of an item is a shape; everything else (time warp, pose, shear, elastic wobble, amplitude,
noise) is a random nuisance drawn per item. That is the setting in which sampling at learned offsets
should pay off, so these sets let the deformable backbones be compared with their plain twins without
any download.

Items are generated on the fly from a `torch.Generator` seeded by `derive_seed(seed, index)`, so item
`i` of a dataset with seed `s` is the same tensor in every run, process and DataLoader worker.
"""

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

Task = Literal["classification", "segmentation"]
TASKS: tuple[str, ...] = ("classification", "segmentation")

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(*keys: int) -> int:
    """A 64-bit seed mixed from integer keys (e.g. dataset seed and item index).

    A plain `seed * n + index` would make item `n` of seed 0 equal item 0 of seed 1; mixing through
    splitmix64 keeps streams of nearby seeds and indices unrelated.
    """
    state = 0
    for key in keys:
        state = _splitmix64(state ^ (key & _MASK64))
    return state


def check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    """ValueError naming `name` unless `value` is an int in [low, high] (high None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _check_noise(noise: float) -> None:
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not 0 <= noise < math.inf:
        raise ValueError(f"noise: expected a finite float >= 0, got {noise!r}")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")


def _standardise(values: Tensor) -> Tensor:
    return (values - values.mean()) / values.std().clamp_min(1e-6)


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


class _SeededDataset(Dataset[tuple[Tensor, Tensor]]):
    """Map-style base: a fresh generator per item, seeded from (seed, index)."""

    def __init__(self, num_samples: int, num_classes: int, max_classes: int, seed: int, noise: float) -> None:
        check_int("num_samples", num_samples, 0)
        check_int("num_classes", num_classes, 1, max_classes)
        check_int("seed", seed, -(1 << 63))
        _check_noise(noise)
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.seed = seed
        self.noise = float(noise)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index: expected in [0, {self.num_samples}), got {index}")
        index %= self.num_samples
        generator = torch.Generator().manual_seed(derive_seed(self.seed, index))
        return self._make_item(index, generator)

    def _make_item(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def _gaussian(t: Tensor, center: float, width: float) -> Tensor:
    return torch.exp(-0.5 * ((t - center) / width) ** 2)


# Waveforms on t in [0, 1]; chosen so that no warp of one is another (counts of extrema and edges differ).
SIGNAL_TEMPLATES: dict[str, Callable[[Tensor], Tensor]] = {
    "bump": lambda t: _gaussian(t, 0.5, 0.08),
    "two_bumps": lambda t: _gaussian(t, 0.3, 0.06) + _gaussian(t, 0.7, 0.06),
    "step": lambda t: torch.sigmoid((t - 0.5) / 0.02),
    "oscillation": lambda t: torch.sin(2 * math.pi * 6 * t),
    "sawtooth": lambda t: torch.where(t < 0.9, ((t - 0.1) / 0.8).clamp(0, 1), 0.0),
    "biphasic": lambda t: (t - 0.5) / 0.08 * _gaussian(t, 0.5, 0.08),
}


class WarpedSignals(_SeededDataset):
    """1D signals: class k is the waveform `list(SIGNAL_TEMPLATES)[k]` after a random smooth monotonic time
    warp, a random shift and amplitude, plus Gaussian noise; each signal standardised.

    Item: (signal (1, length) float32, label () int64). Labels are `index % num_classes`, so every split
    is balanced.
    """

    warp_knots = 8
    warp_strength = 0.5  # log-std of the knot-to-knot speed of the warped clock
    max_shift = 0.1
    amplitude_range = (0.5, 1.5)

    def __init__(
        self, num_samples: int, length: int = 256, num_classes: int = 4, seed: int = 0, noise: float = 0.1
    ) -> None:
        super().__init__(num_samples, num_classes, len(SIGNAL_TEMPLATES), seed, noise)
        check_int("length", length, 8)
        self.length = length
        # Names, not the functions: lambdas do not pickle into spawned DataLoader workers.
        self.template_names = list(SIGNAL_TEMPLATES)[:num_classes]

    def _make_item(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        label = index % self.num_classes
        speeds = torch.exp(self.warp_strength * torch.randn(self.warp_knots, generator=generator))
        # Cumulated positive speeds: a clock that only runs forward, from 0 to 1.
        knot_times = F.pad(speeds.cumsum(0), (1, 0)) / speeds.sum()
        warped_time = F.interpolate(knot_times.view(1, 1, -1), size=self.length, mode="linear", align_corners=True)
        shift = _uniform(generator, -self.max_shift, self.max_shift)
        amplitude = _uniform(generator, *self.amplitude_range)
        signal = amplitude * SIGNAL_TEMPLATES[self.template_names[label]](warped_time.view(1, self.length) + shift)
        signal = signal + self.noise * torch.randn(1, self.length, generator=generator)
        return _standardise(signal), torch.tensor(label, dtype=torch.int64)


# Signed distance functions (negative inside) of shapes centred in [-1, 1]^d; coords: (d, *spatial),
# axis 0 the first spatial dim. Boxes use the Chebyshev distance, exact inside and close enough outside
# for a soft edge.
SignedDistance = Callable[[Tensor], Tensor]


def _box(coords: Tensor, half_extents: Sequence[float], center: Sequence[float] | None = None) -> Tensor:
    view = (-1,) + (1,) * (coords.dim() - 1)
    if center is not None:
        coords = coords - torch.tensor(center).view(view)
    return (coords.abs() - torch.tensor(half_extents).view(view)).amax(0)


def _radius(coords: Tensor) -> Tensor:
    return coords.norm(dim=0)


def _triangle(coords: Tensor) -> Tensor:
    angles = torch.tensor([-math.pi / 2, math.pi / 6, 5 * math.pi / 6])
    normals = torch.stack([angles.sin(), angles.cos()], dim=1)  # (3, 2) in (y, x)
    return torch.einsum("nd,d...->n...", normals, coords).amax(0) - 0.28


SHAPES_2D: dict[str, SignedDistance] = {
    "disc": lambda c: _radius(c) - 0.5,
    "square": lambda c: _box(c, (0.4, 0.4)),
    "triangle": _triangle,
    "cross": lambda c: torch.minimum(_box(c, (0.55, 0.16)), _box(c, (0.16, 0.55))),
    "ring": lambda c: (_radius(c) - 0.4).abs() - 0.14,
    "ell": lambda c: torch.minimum(_box(c, (0.5, 0.15), (0.0, -0.3)), _box(c, (0.15, 0.45), (0.35, 0.05))),
}

SHAPES_3D: dict[str, SignedDistance] = {
    "ball": lambda c: _radius(c) - 0.5,
    "cube": lambda c: _box(c, (0.4, 0.4, 0.4)),
    "rod": lambda c: torch.maximum(_radius(c[1:]) - 0.2, c[0].abs() - 0.6),
    "shell": lambda c: (_radius(c) - 0.42).abs() - 0.15,
    "cross": lambda c: torch.stack(
        [_box(c, (0.6, 0.17, 0.17)), _box(c, (0.17, 0.6, 0.17)), _box(c, (0.17, 0.17, 0.6))]
    ).amin(0),
    "torus": lambda c: torch.sqrt((_radius(c[1:]) - 0.4) ** 2 + c[0] ** 2) - 0.17,
}


def pixel_centres(dims: int, size: int) -> Tensor:
    """(dims, *[size] * dims) coordinates of the pixel centres in [-1, 1], as `grid_sample` with
    `align_corners=False` places them."""
    axis = torch.linspace(-1 + 1 / size, 1 - 1 / size, size)
    return torch.stack(torch.meshgrid(*[axis] * dims, indexing="ij"))


def random_rotation(generator: torch.Generator, dims: int) -> Tensor:
    """A (dims, dims) rotation drawn uniformly (Haar measure), any dimension."""
    q, r = torch.linalg.qr(torch.randn(dims, dims, generator=generator))
    # The sign fix makes QR's orthogonal factor Haar-distributed; flipping a column makes it proper.
    rotation = q * torch.sign(torch.diagonal(r))
    if torch.det(rotation) < 0:
        rotation[:, 0] = -rotation[:, 0]
    return rotation


class _DeformedShapes(_SeededDataset):
    """N-D shapes rasterised softly, then resampled through a random affine composed with a smooth
    elastic displacement field (`grid_sample`)."""

    scale_range = (0.7, 1.2)
    max_shear = 0.2
    max_translation = 0.2
    # Segmentation fits 1-3 shapes in one image: smaller and spread wider than the single centred shape.
    segmentation_scale = 0.6
    segmentation_max_translation = 0.45
    max_shapes_per_image = 3
    elastic_knots = 4
    elastic_amplitude = 0.08  # std of the displacement at each coarse knot, in [-1, 1] units

    def __init__(
        self,
        dims: int,
        shapes: dict[str, SignedDistance],
        num_samples: int,
        size: int,
        num_classes: int,
        seed: int,
        task: Task,
        noise: float,
    ) -> None:
        super().__init__(num_samples, num_classes, len(shapes), seed, noise)
        check_int("size", size, 8)
        _check_task(task)
        self.dims = dims
        self.size = size
        self.task = task
        self.shape_names = list(shapes)[:num_classes]
        coords = pixel_centres(dims, size)
        # Soft edge of about one pixel: a pixel is 2 / size wide in [-1, 1] units.
        templates = [torch.sigmoid(-shapes[name](coords) * size) for name in self.shape_names]
        self.templates = torch.stack(templates).unsqueeze(1)  # (num_classes, 1, *spatial)

    def _random_grid(self, generator: torch.Generator, scale: float, max_translation: float) -> Tensor:
        """(1, *spatial, dims) sampling grid: where each output pixel reads the template."""
        dims = self.dims
        shear = torch.eye(dims) + _uniform(generator, -self.max_shear, self.max_shear, dims, dims).triu(1)
        zoom = scale * _uniform(generator, *self.scale_range)
        forward = random_rotation(generator, dims) @ shear * zoom
        translation = _uniform(generator, -max_translation, max_translation, dims, 1)
        # grid_sample pulls: output point y reads the template at forward^-1 (y - translation). All draws
        # are symmetric across axes, so grid_sample's (x, y, z) axis order needs no permutation.
        inverse = torch.linalg.inv(forward)
        theta = torch.cat([inverse, -inverse @ translation], dim=1).unsqueeze(0)
        spatial = [self.size] * dims
        grid = F.affine_grid(theta, [1, 1, *spatial], align_corners=False)
        knots = self.elastic_amplitude * torch.randn(1, dims, *[self.elastic_knots] * dims, generator=generator)
        mode = "bilinear" if dims == 2 else "trilinear"
        displacement = F.interpolate(knots, size=spatial, mode=mode, align_corners=True)
        return grid + displacement.movedim(1, -1)

    def _render(
        self, generator: torch.Generator, classes: list[int], scale: float, max_translation: float
    ) -> tuple[Tensor, Tensor]:
        """(image (1, *spatial) float32, target (*spatial) int64) for shapes of `classes`, later ones on top."""
        grids = torch.cat([self._random_grid(generator, scale, max_translation) for _ in classes])
        masks = F.grid_sample(self.templates[classes], grids, mode="bilinear", align_corners=False)
        target = torch.zeros(masks.shape[2:], dtype=torch.int64)
        for mask, shape_class in zip(masks[:, 0], classes, strict=True):
            target[mask > 0.5] = shape_class + 1
        image = masks.amax(0) + self.noise * torch.randn(masks.shape[1:], generator=generator)
        return _standardise(image), target

    def _make_item(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.task == "classification":
            label = index % self.num_classes
            image, _ = self._render(generator, [label], 1.0, self.max_translation)
            return image, torch.tensor(label, dtype=torch.int64)
        count = int(torch.randint(1, self.max_shapes_per_image + 1, (), generator=generator))
        classes = torch.randint(0, self.num_classes, (count,), generator=generator).tolist()
        return self._render(generator, classes, self.segmentation_scale, self.segmentation_max_translation)


class DeformedShapes2d(_DeformedShapes):
    """2D images of the shapes in `SHAPES_2D` (class k is the k-th), randomly rotated, scaled (0.7-1.2),
    sheared, translated and elastically warped, plus Gaussian noise; each image standardised.

    Item, task "classification": (image (1, size, size) float32, label () int64), labels `index % num_classes`.
    Item, task "segmentation": (image (1, size, size) float32, target (size, size) int64) with 1-3 shapes of
    random classes; target 0 is background and k + 1 shape class k (later shapes overwrite earlier ones).
    """

    def __init__(
        self,
        num_samples: int,
        size: int = 32,
        num_classes: int = 4,
        seed: int = 0,
        task: Task = "classification",
        noise: float = 0.05,
    ) -> None:
        super().__init__(2, SHAPES_2D, num_samples, size, num_classes, seed, task, noise)


class DeformedShapes3d(_DeformedShapes):
    """3D volumes of the shapes in `SHAPES_3D`, deformed as in `DeformedShapes2d` by a 3D affine and
    elastic warp.

    Item, task "classification": (volume (1, size, size, size) float32, label () int64).
    Item, task "segmentation": (volume (1, size, size, size) float32, target (size, size, size) int64).
    """

    def __init__(
        self,
        num_samples: int,
        size: int = 16,
        num_classes: int = 4,
        seed: int = 0,
        task: Task = "classification",
        noise: float = 0.05,
    ) -> None:
        super().__init__(3, SHAPES_3D, num_samples, size, num_classes, seed, task, noise)
