"""Deformable convolution layers."""

from dcnlab.nn.convert import convert_to_deform
from dcnlab.nn.dcnv3 import ChannelLayerNorm, DCNv3
from dcnlab.nn.deform_conv import DeformConv1d, DeformConv2d, DeformConv3d

__all__ = ["ChannelLayerNorm", "DCNv3", "DeformConv1d", "DeformConv2d", "DeformConv3d", "convert_to_deform"]
