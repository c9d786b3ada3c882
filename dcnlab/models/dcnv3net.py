"""A DCNv3-style hierarchical network (InternImage-like), N-D, with a plain depthwise-conv twin."""

from collections.abc import Sequence

from torch import Tensor, nn

from dcnlab._nd import CONVS
from dcnlab.nn import ChannelLayerNorm, DCNv3


class _DepthwiseMixer(nn.Module):
    """The plain twin of DCNv3: the same projections around a fixed-grid depthwise conv."""

    def __init__(self, channels: int, dims: int, kernel_size: int) -> None:
        super().__init__()
        conv = CONVS[dims]
        self.input_proj = conv(channels, channels, 1)
        self.depthwise = conv(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.output_proj = conv(channels, channels, 1)

    def forward(self, input: Tensor) -> Tensor:
        return self.output_proj(self.depthwise(self.input_proj(input)))


class _Block(nn.Module):
    """Pre-norm residual block: x + mixer(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, channels: int, dims: int, groups: int, deformable: bool, mlp_ratio: float, **dcn) -> None:
        super().__init__()
        conv = CONVS[dims]
        self.norm1 = ChannelLayerNorm(channels)
        self.mixer = DCNv3(channels, dims, groups=groups, **dcn) if deformable else _DepthwiseMixer(channels, dims, 3)
        self.norm2 = ChannelLayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(conv(channels, hidden, 1), nn.GELU(), conv(hidden, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DCNv3Net(nn.Module):
    """Four stages of DCNv3 blocks at strides 4, 8, 16, 32 (InternImage's layout), N-D.

    Args:
        dim: spatial dims, 1, 2 or 3.
        in_channels, num_classes: input channels and classifier outputs.
        channels: width of the first stage; stage i has channels * 2**i.
        depths: blocks per stage.
        group_channels: channels per offset group of DCNv3 (groups = stage width / this).
        deformable: False gives the plain twin, a depthwise 3x3 conv in place of each DCNv3.
        modulation, offset_scale: passed to DCNv3.
    """

    def __init__(
        self,
        dim: int = 2,
        in_channels: int = 3,
        num_classes: int = 1000,
        channels: int = 64,
        depths: Sequence[int] = (2, 2, 6, 2),
        group_channels: int = 16,
        deformable: bool = True,
        modulation: str = "softmax",
        offset_scale: float = 1.0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if dim not in CONVS:
            raise ValueError(f"dim: expected 1, 2 or 3, got {dim}")
        if channels % group_channels:
            raise ValueError(f"group_channels: expected a divisor of channels={channels}, got {group_channels}")
        conv = CONVS[dim]
        self.stem = nn.Sequential(
            conv(in_channels, channels // 2, 3, stride=2, padding=1),
            ChannelLayerNorm(channels // 2),
            nn.GELU(),
            conv(channels // 2, channels, 3, stride=2, padding=1),
            ChannelLayerNorm(channels),
        )
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        width = channels
        for index, depth in enumerate(depths):
            if index > 0:
                self.downsamples.append(
                    nn.Sequential(conv(width, 2 * width, 3, stride=2, padding=1), ChannelLayerNorm(2 * width))
                )
                width *= 2
            blocks = [
                _Block(
                    width,
                    dim,
                    width // group_channels,
                    deformable,
                    mlp_ratio,
                    modulation=modulation,
                    offset_scale=offset_scale,
                )
                for _ in range(depth)
            ]
            self.stages.append(nn.Sequential(*blocks))
        self.num_features = width
        self.head_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """(B, in_channels, *spatial) -> the four stage outputs (B, channels * 2**i, *spatial / 2**(i+2))."""
        x = self.stem(x)
        features = []
        for index, stage in enumerate(self.stages):
            if index > 0:
                x = self.downsamples[index - 1](x)
            x = stage(x)
            features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, *spatial) -> logits (B, num_classes)."""
        pooled = self.forward_features(x)[-1].flatten(2).mean(dim=2)
        return self.head(self.head_norm(pooled))
