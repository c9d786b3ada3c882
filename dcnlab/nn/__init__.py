"""Deformable convolution layers."""

from dcnlab.nn.convert import convert_to_deform
from dcnlab.nn.deform_conv import DeformConv1d, DeformConv2d, DeformConv3d

__all__ = ["DeformConv1d", "DeformConv2d", "DeformConv3d", "convert_to_deform"]
