"""LightningDataModules over real data: scikit-learn digits, MNIST/CIFAR-10, image folders, .npy volume folders
and UCR time-series archives.

Every module exposes the attributes `python -m dcnlab train` builds the model from (`dim`, `task` =
"classification", `in_channels`, `num_classes`) and serves batches (input (B, C, *spatial) float32, target (B,)
int64), like `SyntheticDataModule`: the train loader is shuffled with a generator seeded from `seed`, and the
train/val/test splits are drawn from `seed` too, so a seed fixes both.
"""

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from dcnlab.data.datamodules import SeededDataModule
from dcnlab.data.synthetic import check_int, derive_seed

# A key of its own (SeededDataModule uses 0-3), so the split and the shuffle never share a stream.
_SPLIT_KEY = 4
TORCHVISION_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# ImageFolder data is usually natural RGB photos, for which the ImageNet statistics are the usual choice.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"{name}: expected a number in (0, 1), got {value!r}")


def _check_dir(name: str, path: str | Path, hint: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: no folder at {path} ({hint})")
    return path


def split_indices(num_samples: int, fractions: Sequence[float], seed: int, what: str) -> list[list[int]]:
    """Disjoint index lists covering range(num_samples): one per fraction (at least one sample each), then the rest.

    The order is a permutation seeded from `seed`, so the split depends only on the seed and the sample count.
    `what` names the argument that supplied the samples, for the error when there are too few.
    """
    counts = [max(1, round(num_samples * f)) for f in fractions]
    if num_samples - sum(counts) < 1:
        raise ValueError(f"{what}: {num_samples} samples are too few for split fractions {list(fractions)}")
    generator = torch.Generator().manual_seed(derive_seed(seed, _SPLIT_KEY))
    order = torch.randperm(num_samples, generator=generator).tolist()
    splits, start = [], 0
    for count in counts:
        splits.append(sorted(order[start : start + count]))
        start += count
    splits.append(sorted(order[start:]))
    return splits


def label_indices(labels: Sequence[str]) -> tuple[list[str], list[int]]:
    """Class names (sorted: numerically if every label is an int, else as strings) and each label's index."""
    unique = set(labels)
    try:
        names = sorted(unique, key=int)
    except ValueError:
        names = sorted(unique)
    lookup = {name: i for i, name in enumerate(names)}
    return names, [lookup[label] for label in labels]


class DigitsDataModule(SeededDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1797 real images, 10 classes; nothing to download).

    Images are scaled to [0, 1], upscaled bilinearly to (size, size) (8 keeps the originals) and normalised with
    the train split's mean and std. Splits: val and test by fraction, train the rest, drawn from `seed`.

    Batches: (input (B, 1, size, size) float32, target (B,) int64).
    """

    def __init__(
        self,
        size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_int("size", size, 8)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        self.save_hyperparameters()
        from sklearn.datasets import load_digits  # scikit-learn is only needed for this module

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        if size != 8:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        targets = torch.as_tensor(digits.target, dtype=torch.int64)
        val, test, train = split_indices(len(targets), (val_fraction, test_fraction), seed, "val_fraction")
        # Train statistics only, so val/test never leak into the normalisation.
        mean, std = images[train].mean(), images[train].std()
        images = (images - mean) / std
        self.dim, self.in_channels, self.num_classes, self.size = 2, 1, 10, size
        # Positions in load_digits() of each split's samples, for inspecting or reproducing the split.
        self.indices = {"train": train, "val": val, "test": test}
        self.train_set = TensorDataset(images[train], targets[train])
        self.val_set = TensorDataset(images[val], targets[val])
        self.test_set = TensorDataset(images[test], targets[test])


class TorchvisionDataModule(SeededDataModule):
    """torchvision's MNIST (1 x 28 x 28) or CIFAR-10 (3 x 32 x 32), 10 classes each.

    The official train split is divided into train and val (`val_fraction`, drawn from `seed`); test is the
    official test split. Inputs are normalised with the dataset's usual per-channel mean and std. With
    `download=True` the files are fetched into `root` in `prepare_data()`; otherwise they must already be there.

    Batches: (input (B, C, H, W) float32, target (B,) int64).
    """

    def __init__(
        self,
        name: str,
        root: str,
        download: bool = False,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if name not in TORCHVISION_STATS:
            raise ValueError(f"name: expected one of {tuple(TORCHVISION_STATS)}, got {name!r}")
        if not isinstance(download, bool):
            raise ValueError(f"download: expected a bool, got {download!r}")
        _check_fraction("val_fraction", val_fraction)
        self.save_hyperparameters()
        self.name, self.root, self.download, self.val_fraction = name, Path(root).expanduser(), download, val_fraction
        self.dim, self.num_classes = 2, 10
        self.in_channels = len(TORCHVISION_STATS[name][0])

    def _dataset(self, train: bool, download: bool) -> Dataset:
        from torchvision import datasets, transforms

        cls = datasets.MNIST if self.name == "mnist" else datasets.CIFAR10
        mean, std = TORCHVISION_STATS[self.name]
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        try:
            return cls(str(self.root), train=train, transform=transform, download=download)
        except RuntimeError as error:  # torchvision's "Dataset not found" does not say which setting to change
            raise FileNotFoundError(
                f"root: no {self.name} data at {self.root} (set data.root=... or data.download=true)"
            ) from error

    def prepare_data(self) -> None:
        # Lightning calls this on one process only, so concurrent ranks never download into the same folder.
        if self.download:
            self._dataset(train=True, download=True)
            self._dataset(train=False, download=True)

    def _build(self) -> None:
        full_train = self._dataset(train=True, download=False)
        val, train = split_indices(len(full_train), (self.val_fraction,), self.seed, "val_fraction")
        self.train_set, self.val_set = Subset(full_train, train), Subset(full_train, val)
        self.test_set = self._dataset(train=False, download=False)


class ImageFolderDataModule(SeededDataModule):
    """torchvision's ImageFolder: `<root>/<class name>/<image>`, classes from the sorted folder names.

    Images are read as RGB, resized to (size, size) and normalised with the ImageNet statistics. Splits: val
    and test by fraction, train the rest, drawn from `seed`.

    Batches: (input (B, 3, size, size) float32, target (B,) int64).
    """

    def __init__(
        self,
        root: str,
        size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_int("size", size, 8)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        self.save_hyperparameters()
        from torchvision import datasets, transforms

        root_path = _check_dir("root", root, "set data.root=... to a folder of class folders")
        transform = transforms.Compose(
            [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(*IMAGENET_STATS)]
        )
        try:
            dataset = datasets.ImageFolder(str(root_path), transform=transform)
        except FileNotFoundError as error:  # no class folders, or no image files in them
            raise FileNotFoundError(f"root: no images in class folders under {root_path} ({error})") from error
        if len(dataset.classes) < 2:
            raise ValueError(f"root: classification needs at least 2 class folders, found {dataset.classes}")
        val, test, train = split_indices(len(dataset), (val_fraction, test_fraction), seed, "root")
        self.classes: list[str] = dataset.classes
        self.dim, self.in_channels, self.num_classes, self.size = 2, 3, len(dataset.classes), size
        self.train_set, self.val_set, self.test_set = (
            Subset(dataset, train),
            Subset(dataset, val),
            Subset(dataset, test),
        )


class NpyVolumes(Dataset):
    """Volumes from .npy files, loaded on access and z-normalised per volume.

    Items: (volume (C, D, H, W) float32, label () int64); a (D, H, W) file gets C = 1.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int]) -> None:
        self.paths, self.labels = list(paths), list(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        volume = torch.as_tensor(np.load(self.paths[index]), dtype=torch.float32)
        if volume.ndim == 3:
            volume = volume.unsqueeze(0)
        # Per-volume statistics: scanners and protocols differ in intensity scale, so no global constant fits.
        volume = (volume - volume.mean()) / volume.std().clamp_min(1e-6)
        return volume, torch.tensor(self.labels[index], dtype=torch.int64)


class VolumeFolderDataModule(SeededDataModule):
    """A folder of .npy volumes, (D, H, W) or (C, D, H, W) all of one shape, labelled by a CSV.

    `<root>/<labels_csv>` has a header with columns `file` (path relative to root) and `label` (an int or a
    class name; the sorted unique labels become classes 0..K-1). Splits: val and test by fraction, train the
    rest, drawn from `seed`. Volumes are read lazily and z-normalised per volume.

    Batches: (input (B, C, D, H, W) float32, target (B,) int64).
    """

    def __init__(
        self,
        root: str,
        labels_csv: str = "labels.csv",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        self.save_hyperparameters()
        root_path = _check_dir("root", root, "set data.root=... to the folder of .npy volumes")
        csv_path = root_path / labels_csv
        if not csv_path.is_file():
            raise FileNotFoundError(f"labels_csv: no file at {csv_path} (set data.labels_csv=...)")
        with csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"file", "label"} <= set(reader.fieldnames):
                raise ValueError(f"labels_csv: {csv_path} needs a header with columns file,label")
            rows = [(row["file"].strip(), row["label"].strip()) for row in reader]
        if not rows:
            raise ValueError(f"labels_csv: {csv_path} lists no volumes")
        paths = [root_path / file for file, _ in rows]
        shapes = set()
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"labels_csv: {csv_path} lists {path.name}, but there is no file at {path}")
            # Memory-mapped: reads only the header, so checking every shape stays cheap for large volumes.
            shapes.add(np.load(path, mmap_mode="r").shape)
        if len(shapes) != 1 or len(next(iter(shapes))) not in (3, 4):
            raise ValueError(f"root: expected .npy volumes of one (D, H, W) or (C, D, H, W) shape, got {shapes}")
        shape = next(iter(shapes))
        self.classes, labels = label_indices([label for _, label in rows])
        if len(self.classes) < 2:
            raise ValueError(f"labels_csv: classification needs at least 2 labels, found {self.classes}")
        dataset = NpyVolumes(paths, labels)
        val, test, train = split_indices(len(dataset), (val_fraction, test_fraction), seed, "labels_csv")
        self.dim, self.num_classes = 3, len(self.classes)
        self.in_channels = 1 if len(shape) == 3 else shape[0]
        self.train_set, self.val_set, self.test_set = (
            Subset(dataset, train),
            Subset(dataset, val),
            Subset(dataset, test),
        )


def read_ucr_tsv(path: Path) -> tuple[list[str], Tensor]:
    """Labels and series (N, L) float32 of a UCR .tsv file; NaN where a row is padded or shorter than L."""
    labels, rows = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        fields = line.replace(",", "\t").split("\t")  # a few older archive files use commas
        labels.append(fields[0].strip())
        rows.append([float(value) for value in fields[1:] if value.strip()])
    if not rows:
        raise ValueError(f"root: {path} has no series")
    length = max(len(row) for row in rows)
    series = torch.full((len(rows), length), math.nan)
    for i, row in enumerate(rows):
        series[i, : len(row)] = torch.tensor(row)
    return labels, series


def _z_normalise(series: Tensor) -> Tensor:
    """Per-series z-normalisation over the non-NaN values, then NaN padding set to 0 (the new mean)."""
    valid = ~series.isnan()
    count = valid.sum(dim=1, keepdim=True).clamp_min(1)
    values = series.nan_to_num(0.0)
    mean = values.sum(dim=1, keepdim=True) / count
    var = (((values - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
    normalised = (values - mean) / var.sqrt().clamp_min(1e-8)
    return torch.where(valid, normalised, torch.zeros_like(normalised))


class UCRDataModule(SeededDataModule):
    """A UCR time-series archive dataset: `<root>/<name>/<name>_TRAIN.tsv` and `<name>_TEST.tsv`.

    Each row is the label, then the series (tab-separated). Labels (ints or strings) become classes 0..K-1 in
    sorted order over both files. Series are z-normalised each; NaN padding of variable-length series and short
    rows become 0. Val is split from the train file by `val_fraction` and `seed`; test is the test file.

    Batches: (input (B, 1, L) float32, target (B,) int64).
    """

    def __init__(
        self,
        root: str,
        name: str,
        val_fraction: float = 0.2,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a UCR dataset name such as 'GunPoint', got {name!r}")
        _check_fraction("val_fraction", val_fraction)
        self.save_hyperparameters()
        root_path = _check_dir("root", root, "set data.root=... to the folder holding the UCR dataset folders")
        files = {split: root_path / name / f"{name}_{split}.tsv" for split in ("TRAIN", "TEST")}
        for path in files.values():
            if not path.is_file():
                raise FileNotFoundError(f"name: no file at {path} (check data.root and data.name)")
        train_labels, train_series = read_ucr_tsv(files["TRAIN"])
        test_labels, test_series = read_ucr_tsv(files["TEST"])
        # Train and test may be padded to different lengths; pad both to the longer one so the model sees one L.
        length = max(train_series.shape[1], test_series.shape[1])
        train_series = F.pad(train_series, (0, length - train_series.shape[1]), value=math.nan)
        test_series = F.pad(test_series, (0, length - test_series.shape[1]), value=math.nan)
        self.classes, targets = label_indices(train_labels + test_labels)
        if len(self.classes) < 2:
            raise ValueError(f"name: classification needs at least 2 labels, found {self.classes}")
        targets = torch.tensor(targets, dtype=torch.int64)
        train_targets, test_targets = targets[: len(train_labels)], targets[len(train_labels) :]
        train_inputs = _z_normalise(train_series).unsqueeze(1)  # (N, 1, L)
        test_inputs = _z_normalise(test_series).unsqueeze(1)
        val, train = split_indices(len(train_targets), (val_fraction,), seed, "name")
        self.dim, self.in_channels, self.num_classes, self.length = 1, 1, len(self.classes), length
        self.train_set = TensorDataset(train_inputs[train], train_targets[train])
        self.val_set = TensorDataset(train_inputs[val], train_targets[val])
        self.test_set = TensorDataset(test_inputs, test_targets)
