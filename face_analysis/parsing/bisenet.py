"""BiSeNet face parser (19 CelebAMask-HQ classes) with a ResNet-18 context path.

The module tree reproduces the parameter names of zllrunning/face-parsing.PyTorch's
``BiSeNet(n_classes=19)`` (the ``79999_iter.pth`` checkpoint, re-hosted by ConsistentID as
``face_parsing.pth``), so that file loads key for key. Written from the published architecture
(Yu et al., "BiSeNet", ECCV 2018, as adapted by that repository):

- context path ``cp``: ResNet-18 ``cp.resnet`` (no fc) giving features at strides 8, 16 and 32;
  attention refinement modules ``arm16`` (256->128) and ``arm32`` (512->128); a global-average
  branch ``conv_avg`` (512->128, 1x1) added to the stride-32 features; nearest-neighbour
  upsampling with 3x3 ``conv_head32`` / ``conv_head16`` after each step;
- no spatial path: the stride-8 ResNet feature (128 channels) stands in for it;
- feature fusion ``ffm`` (concat 128+128 -> 256, channel attention with a 256->64->256 bottleneck);
- heads ``conv_out`` (256->256->classes) on the fused features and the auxiliary heads
  ``conv_out16`` / ``conv_out32`` (128->64->classes) used only for training losses.

Every convolution is bias-free and followed by BatchNorm (except the 1x1 classifiers and the
fusion bottleneck). Inputs are ImageNet-normalised RGB ``[N,3,H,W]`` (512x512 in training);
outputs are logits at the input resolution (bilinear, ``align_corners=True``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 19


class ConvBNReLU(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU; parameters ``conv.weight`` and ``bn.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = F.relu(self.bn1(self.conv1(x)))
        residual = self.bn2(self.conv2(residual))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1))


class ResNet18Features(nn.Module):
    """ResNet-18 trunk without the classifier; returns the stride-8, -16 and -32 feature maps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        x = self.layer1(x)
        stride8 = self.layer2(x)
        stride16 = self.layer3(stride8)
        stride32 = self.layer4(stride16)
        return stride8, stride16, stride32


class AttentionRefinement(nn.Module):
    """3x3 ConvBNReLU, then a per-channel gate from the globally pooled features."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, 3)
        self.conv_atten = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        gate = features.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.bn_atten(self.conv_atten(gate)))
        return features * gate


class ContextPath(nn.Module):
    """ResNet-18 with attention refinement and a global context branch (BiSeNet's context path)."""

    def __init__(self):
        super().__init__()
        self.resnet = ResNet18Features()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, 3)
        self.conv_head16 = ConvBNReLU(128, 128, 3)
        self.conv_avg = ConvBNReLU(512, 128, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stride8, stride16, stride32 = self.resnet(x)
        # Global context: pooled stride-32 features, broadcast back over the stride-32 grid.
        context = self.conv_avg(stride32.mean(dim=(2, 3), keepdim=True))
        refined32 = self.arm32(stride32) + context
        up32 = self.conv_head32(F.interpolate(refined32, size=stride16.shape[2:], mode="nearest"))
        refined16 = self.arm16(stride16) + up32
        up16 = self.conv_head16(F.interpolate(refined16, size=stride8.shape[2:], mode="nearest"))
        # stride-8 backbone features (the "spatial" input), context at stride 8, context at stride 16
        return stride8, up16, up32


class FeatureFusion(nn.Module):
    """Concatenate spatial and context features, 1x1 ConvBNReLU, then a residual channel attention."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_channels, out_channels, 1)
        self.conv1 = nn.Conv2d(out_channels, out_channels // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels // 4, out_channels, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        fused = self.convblk(torch.cat([spatial, context], dim=1))
        gate = fused.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(gate))))
        return fused + fused * gate


class SegmentationHead(nn.Module):
    """3x3 ConvBNReLU then a bias-free 1x1 classifier."""

    def __init__(self, in_channels: int, mid_channels: int, num_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, mid_channels, 3)
        self.conv_out = nn.Conv2d(mid_channels, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face parser; ``forward`` returns ``[N, num_classes, H, W]`` logits (main head only).

    ``forward(x, with_aux=True)`` also returns the two auxiliary heads (training only).
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.num_classes = num_classes
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = SegmentationHead(256, 256, num_classes)
        self.conv_out16 = SegmentationHead(128, 64, num_classes)
        self.conv_out32 = SegmentationHead(128, 64, num_classes)

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        size = x.shape[2:]
        spatial, context8, context16 = self.cp(x)
        logits = self.conv_out(self.ffm(spatial, context8))
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        if not with_aux:
            return logits
        aux16 = F.interpolate(self.conv_out16(context8), size=size, mode="bilinear", align_corners=True)
        aux32 = F.interpolate(self.conv_out32(context16), size=size, mode="bilinear", align_corners=True)
        return logits, aux16, aux32
