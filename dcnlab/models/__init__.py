"""N-D backbones with deformable convolutions, each with a plain-conv twin (`deformable=False`)."""

from collections.abc import Callable

from torch import nn

from dcnlab.models.dcnv3net import DCNv3Net
from dcnlab.models.resnet import ResNetDCN, resnet18, resnet34, resnet50
from dcnlab.models.unet import UNetDCN, unet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "unet": unet,
    "dcnv3net": DCNv3Net,
}


def create_model(name: str, **kwargs) -> nn.Module:
    """The model registered as `name`, built with kwargs (its class's constructor arguments, `dim` included)."""
    if name not in MODELS:
        raise ValueError(f"name: expected one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)


__all__ = ["MODELS", "DCNv3Net", "ResNetDCN", "UNetDCN", "create_model", "resnet18", "resnet34", "resnet50", "unet"]
