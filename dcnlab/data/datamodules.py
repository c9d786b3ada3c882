"""LightningDataModules that serve the synthetic datasets for 1D, 2D and 3D tasks."""

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dcnlab.data.synthetic import (
    SHAPES_2D,
    SHAPES_3D,
    SIGNAL_TEMPLATES,
    TASKS,
    DeformedShapes2d,
    DeformedShapes3d,
    Task,
    WarpedSignals,
    check_int,
    derive_seed,
)

DEFAULT_SIZES = {1: 256, 2: 32, 3: 16}
_MAX_CLASSES = {1: len(SIGNAL_TEMPLATES), 2: len(SHAPES_2D), 3: len(SHAPES_3D)}
# Keys mixed with the user's seed so that train/val/test items and the shuffle order never share a stream.
_SPLIT_KEYS = {"train": 0, "val": 1, "test": 2, "shuffle": 3}


class SeededDataModule(L.LightningDataModule):
    """Shared argument checks and loaders; subclasses set `train_set`, `val_set`, `test_set` (or `_build`)."""

    task = "classification"

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, -(1 << 63))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _build(self) -> None:
        """Fills the three splits; only lazily loaded modules override it."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._build()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()  # the loaders also work without a Trainer calling setup() first
        # A fresh seeded generator per call: each fit sees the same sequence of epoch orders.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, _SPLIT_KEYS["shuffle"])) if shuffle else None
        return DataLoader(
            getattr(self, f"{split}_set"),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class SyntheticDataModule(SeededDataModule):
    """Train/val/test splits of `WarpedSignals` (dim 1), `DeformedShapes2d` (dim 2) or `DeformedShapes3d`
    (dim 3), each split from its own seed derived from `seed`.

    Batches: (input (B, 1, *spatial) float32, target) with target (B,) int64 for classification and
    (B, *spatial) int64 for segmentation (dims 2 and 3 only). `spatial` is (size,) * dim.

    Attributes for building a model: `dim`, `task`, `in_channels` (1) and `num_classes` (the number of
    logits: shape classes, plus one for the background in segmentation).
    """

    def __init__(
        self,
        dim: int,
        task: Task = "classification",
        num_classes: int = 4,
        size: int | None = None,
        train_samples: int = 2048,
        val_samples: int = 512,
        test_samples: int = 512,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if dim not in DEFAULT_SIZES:
            raise ValueError(f"dim: expected one of {tuple(DEFAULT_SIZES)}, got {dim!r}")
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        if task == "segmentation" and dim == 1:
            raise ValueError("task: 'segmentation' needs dim 2 or 3, got dim 1 (use 'classification')")
        # One shape class is a valid (binary) segmentation, but not a classification.
        min_classes = 2 if task == "classification" else 1
        if (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, int)
            or not min_classes <= num_classes <= _MAX_CLASSES[dim]
        ):
            raise ValueError(
                f"num_classes: expected an int in [{min_classes}, {_MAX_CLASSES[dim]}] for dim {dim} and "
                f"task {task!r}, got {num_classes!r}"
            )
        size = DEFAULT_SIZES[dim] if size is None else size
        check_int("size", size, 8)
        for name, value in (
            ("train_samples", train_samples),
            ("val_samples", val_samples),
            ("test_samples", test_samples),
        ):
            check_int(name, value, 1)
        self.save_hyperparameters()

        self.dim = dim
        self.task = task
        self.size = size
        self.in_channels = 1
        self.num_classes = num_classes + 1 if task == "segmentation" else num_classes
        # The datasets are lazy (items are generated on access), so building them here costs nothing and
        # keeps the loaders usable without a Trainer calling setup().
        self.train_set = self._make_dataset(train_samples, num_classes, "train")
        self.val_set = self._make_dataset(val_samples, num_classes, "val")
        self.test_set = self._make_dataset(test_samples, num_classes, "test")

    def _make_dataset(self, num_samples: int, num_classes: int, split: str) -> Dataset:
        seed = derive_seed(self.seed, _SPLIT_KEYS[split])
        if self.dim == 1:
            return WarpedSignals(num_samples, length=self.size, num_classes=num_classes, seed=seed)
        shapes = DeformedShapes2d if self.dim == 2 else DeformedShapes3d
        return shapes(num_samples, size=self.size, num_classes=num_classes, seed=seed, task=self.task)
