"""The deformable convolution op: functional API and its pure-PyTorch reference."""

from dcnlab.ops.deform_conv import deform_conv, deform_conv1d, deform_conv2d, deform_conv3d
from dcnlab.ops.reference import deform_conv_reference

__all__ = ["deform_conv", "deform_conv1d", "deform_conv2d", "deform_conv3d", "deform_conv_reference"]
