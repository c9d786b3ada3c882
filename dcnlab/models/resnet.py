"""N-D ResNet (18/34/50) whose 3x3 convs in chosen stages are deformable, and its plain-conv twin.

The layout and module names are torchvision's (`conv1`, `bn1`, `maxpool`, `layer1..4`, `fc`;
blocks with `conv1..3`, `bn1..3`, `downsample`), so with `dim=2` and `base_width=64` a
torchvision ResNet state_dict loads with only the offset predictors (`*.conv_offset.*`) missing.
"""

from collections.abc import Sequence

from torch import Tensor, nn

from dcnlab._nd import ADAPTIVE_AVG_POOLS, BATCH_NORMS, CONVS, DIMS, MAX_POOLS
from dcnlab.nn.deform_conv import DEFORM_CONVS, Modulation


def _conv3x3(
    dim: int,
    in_channels: int,
    out_channels: int,
    stride: int,
    deformable: bool,
    offset_groups: int,
    modulation: Modulation,
) -> nn.Module:
    if deformable:
        return DEFORM_CONVS[dim](
            in_channels,
            out_channels,
            3,
            stride,
            padding=1,
            bias=False,
            offset_groups=offset_groups,
            modulation=modulation,
        )
    return CONVS[dim](in_channels, out_channels, 3, stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual: (B, C_in, *spatial) -> (B, planes, *spatial / stride).

    `conv2` is deformable when `deformable` is set; `downsample` projects the shortcut when the
    shape changes.
    """

    expansion = 1

    def __init__(
        self,
        dim: int,
        in_channels: int,
        planes: int,
        stride: int = 1,
        deformable: bool = False,
        offset_groups: int = 1,
        modulation: Modulation = "sigmoid",
    ) -> None:
        super().__init__()
        self.conv1 = CONVS[dim](in_channels, planes, 3, stride, padding=1, bias=False)
        self.bn1 = BATCH_NORMS[dim](planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(dim, planes, planes, 1, deformable, offset_groups, modulation)
        self.bn2 = BATCH_NORMS[dim](planes)
        self.downsample = _shortcut(dim, in_channels, planes * self.expansion, stride)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual: (B, C_in, *spatial) -> (B, 4*planes, *spatial / stride).

    The stride sits on the 3x3 conv (`conv2`, ResNet v1.5 as in torchvision), which is the
    deformable one when `deformable` is set.
    """

    expansion = 4

    def __init__(
        self,
        dim: int,
        in_channels: int,
        planes: int,
        stride: int = 1,
        deformable: bool = False,
        offset_groups: int = 1,
        modulation: Modulation = "sigmoid",
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = CONVS[dim](in_channels, planes, 1, bias=False)
        self.bn1 = BATCH_NORMS[dim](planes)
        self.conv2 = _conv3x3(dim, planes, planes, stride, deformable, offset_groups, modulation)
        self.bn2 = BATCH_NORMS[dim](planes)
        self.conv3 = CONVS[dim](planes, out_channels, 1, bias=False)
        self.bn3 = BATCH_NORMS[dim](out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(dim, in_channels, out_channels, stride)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(dim: int, in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        CONVS[dim](in_channels, out_channels, 1, stride, bias=False),
        BATCH_NORMS[dim](out_channels),
    )


BLOCKS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class ResNetDCN(nn.Module):
    """ResNet-18/34/50 over 1, 2 or 3 spatial dims with deformable 3x3 convs in chosen stages.

    Args:
        depth: 18, 34 (BasicBlock) or 50 (Bottleneck).
        dim: number of spatial dims, 1, 2 or 3.
        in_channels: channels of the input.
        num_classes: size of the logits.
        dcn_stages: one flag per stage (`layer1..4`); in flagged stages the 3x3 conv of every
            block (`conv2`) is a `dcnlab.nn.DeformConv{dim}d`.
        deformable: False builds the plain-conv twin (same architecture, `dcn_stages` ignored):
            its state_dict is the deformable model's minus the `*.conv_offset.*` entries.
        offset_groups, modulation: passed to every deformable conv; `offset_groups` must divide
            the 3x3 conv's channels (`base_width` in the first stage).
        base_width: channels of the stem and of the first stage's 3x3 convs, doubled per stage
            (64 is the standard ResNet).
        drop_rate: dropout probability before the classifier.
        zero_init_residual: zero the last BatchNorm of each block so every residual branch
            starts as the identity (Goyal et al., 2017).

    Input (B, in_channels, *spatial); the stem and stages downsample by 32 in total (sizes
    round up at each stride-2 step, so any spatial size >= 1 works).
    """

    def __init__(
        self,
        depth: int,
        dim: int,
        in_channels: int = 3,
        num_classes: int = 1000,
        dcn_stages: Sequence[bool] = (False, False, True, True),
        deformable: bool = True,
        offset_groups: int = 1,
        modulation: Modulation = "sigmoid",
        base_width: int = 64,
        drop_rate: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"depth: expected one of {tuple(BLOCKS)}, got {depth!r}")
        if dim not in DIMS:
            raise ValueError(f"dim: expected one of {DIMS}, got {dim!r}")
        if len(dcn_stages) != 4:
            raise ValueError(f"dcn_stages: expected 4 flags (one per stage), got {tuple(dcn_stages)!r}")
        block, blocks_per_stage = BLOCKS[depth]
        self.dim = dim
        self.depth = depth
        self.dcn_stages = tuple(bool(flag) and deformable for flag in dcn_stages)

        self.conv1 = CONVS[dim](in_channels, base_width, 7, 2, padding=3, bias=False)
        self.bn1 = BATCH_NORMS[dim](base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = MAX_POOLS[dim](3, 2, padding=1)

        channels = base_width
        self.stage_channels: list[int] = []
        for index, (num_blocks, stage_deformable) in enumerate(zip(blocks_per_stage, self.dcn_stages, strict=True)):
            planes = base_width * 2**index
            stride = 1 if index == 0 else 2
            layers = []
            for block_index in range(num_blocks):
                layers.append(
                    block(
                        dim,
                        channels,
                        planes,
                        stride if block_index == 0 else 1,
                        stage_deformable,
                        offset_groups,
                        modulation,
                    )
                )
                channels = planes * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
            self.stage_channels.append(channels)

        self.avgpool = ADAPTIVE_AVG_POOLS[dim](1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's scheme, so the plain twin trains like the reference ResNet. The
        # deformable convs' offset predictors keep their zero init (a submodule named
        # conv_offset), which is what makes a fresh model equal its plain twin.
        for name, module in self.named_modules():
            if name.endswith("conv_offset"):
                continue
            if isinstance(module, (*CONVS.values(), *DEFORM_CONVS.values())):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.last_norm().weight)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """(B, in_channels, *spatial) -> the four stage outputs, (B, stage_channels[i], *ceil(spatial / 2**(i+2)))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, *spatial) -> logits (B, num_classes)."""
        pooled = self.avgpool(self.forward_features(x)[-1]).flatten(1)
        return self.fc(self.dropout(pooled))


def resnet18(**kwargs) -> ResNetDCN:
    """ResNet-18-DCN; kwargs are ResNetDCN's (`dim` is required)."""
    return ResNetDCN(depth=18, **kwargs)


def resnet34(**kwargs) -> ResNetDCN:
    """ResNet-34-DCN; kwargs are ResNetDCN's (`dim` is required)."""
    return ResNetDCN(depth=34, **kwargs)


def resnet50(**kwargs) -> ResNetDCN:
    """ResNet-50-DCN; kwargs are ResNetDCN's (`dim` is required)."""
    return ResNetDCN(depth=50, **kwargs)
