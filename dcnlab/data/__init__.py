"""Data modules: synthetic 1D/2D/3D deformation tasks and real-data loaders (digits, MNIST, CIFAR-10,
image folders, .npy volumes, UCR/UEA series)."""

from dcnlab.data.datamodules import SyntheticDataModule
from dcnlab.data.real import (
    DigitsDataModule,
    ImageFolderDataModule,
    TorchvisionDataModule,
    UCRDataModule,
    VolumeFolderDataModule,
)
from dcnlab.data.synthetic import (
    SHAPES_2D,
    SHAPES_3D,
    SIGNAL_TEMPLATES,
    DeformedShapes2d,
    DeformedShapes3d,
    WarpedSignals,
    derive_seed,
)

__all__ = [
    "SHAPES_2D",
    "SHAPES_3D",
    "SIGNAL_TEMPLATES",
    "DeformedShapes2d",
    "DeformedShapes3d",
    "SyntheticDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "TorchvisionDataModule",
    "UCRDataModule",
    "VolumeFolderDataModule",
    "WarpedSignals",
    "derive_seed",
]
