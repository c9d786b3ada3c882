"""Data: synthetic 1D/2D/3D datasets of deformed shapes and the LightningDataModule that serves them."""

from dcnlab.data.datamodules import SyntheticDataModule
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
    "WarpedSignals",
    "derive_seed",
]
