"""Swap the convolutions of an existing model for deformable ones, keeping their weights."""

import fnmatch
from collections.abc import Callable, Sequence

from torch import nn

from dcnlab._nd import CONVS
from dcnlab.nn.deform_conv import DEFORM_CONVS

_DEFORMABLE = {CONVS[dims]: DEFORM_CONVS[dims] for dims in CONVS}

Selector = Callable[[str, nn.Module], bool] | Sequence[str] | None


def _selected(name: str, conv: nn.Module, include: Selector) -> bool:
    if include is None:
        return any(k > 1 for k in conv.kernel_size)  # a 1x1 conv has nothing to deform
    if callable(include):
        return include(name, conv)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in include)


def convert_to_deform(model: nn.Module, include: Selector = None, **layer_kwargs) -> nn.Module:
    """Replaces chosen nn.Conv1d/2d/3d modules of `model`, in place, by DeformConv{1,2,3}d.

    Args:
        model: any module tree, e.g. a torchvision ResNet.
        include: which convs to swap, by qualified module name: None for every conv whose kernel
            is larger than 1, a list of glob patterns (``["layer4.*.conv2"]``), or a predicate
            ``(name, conv) -> bool``.
        layer_kwargs: offset_groups, modulation, offset_scale for the new layers.

    Returns:
        `model`. Each new layer copies its conv's weight and bias, and its offset predictor starts
        at zero, so the converted model computes what the original computed until it trains.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in _DEFORMABLE and _selected(name, module, include)
    ]
    if include is not None and not callable(include) and not targets:
        raise ValueError(f"include: no nn.Conv1d/2d/3d of the model matches {list(include)}")
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _DEFORMABLE[type(conv)].from_conv(conv, **layer_kwargs))
    return model
