"""dcnlab: N-D (1D/2D/3D) modulated deformable convolution for PyTorch."""

import torch  # noqa: F401  (loads libtorch, which the extension links against)

try:
    from dcnlab import _C  # noqa: F401  (registers the dcnlab:: ops with the dispatcher)
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "dcnlab's compiled extension (dcnlab._C) is not built or does not match this torch. "
        "Build it from the repository root with `make setup` or "
        "`pip install --no-build-isolation -e .` (needs a C++ compiler; nvcc for CUDA). "
        f"Original error: {error}"
    ) from error

from dcnlab import nn, ops  # noqa: E402

__all__ = ["nn", "ops"]
__version__ = "0.1.0"
