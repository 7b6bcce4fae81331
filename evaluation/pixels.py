"""Pixel metrics: PSNR / SSIM on aligned face crops, and the change outside an inpainting mask.

PSNR = 10 log10(1 / MSE) on 0..1 pixels (infinite when the crops are identical). SSIM is Wang et al. (2004):
Gaussian window 11 px, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, computed per RGB channel over the valid window
positions and averaged. Both compare the 256 px ArcFace-template crops (face_analysis.align) of the generated
image's largest face and of the reference's, so pose and framing differences of the whole picture do not count,
only the face.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..face_analysis.align import align_faces
from .inputs import MetricContext, largest_face

CROP_SIZE = 256
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2
OUTSIDE_THRESHOLD = 0.5


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two 0..1 tensors of one shape; ``inf`` when equal."""
    mse = float(torch.mean((a.double() - b.double()) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two ``[H,W,3]`` 0..1 images (see the module doc); 1 when equal."""
    x = a.double().permute(2, 0, 1)[:, None]            # [3,1,H,W]: channels as a batch
    y = b.double().permute(2, 0, 1)[:, None]
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA)
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x ** 2
    var_y = F.conv2d(y * y, window) - mu_y ** 2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    denominator = (mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return float((numerator / denominator).mean())


def aligned_crop(ctx: MetricContext, name: str, index: int) -> torch.Tensor | str:
    """The ``CROP_SIZE`` aligned crop ``[S,S,3]`` of the largest face of ``name`` image ``index``, or why not."""
    judge = ctx.models.judge()
    analysis = ctx.faces(judge, name)
    face = largest_face(analysis.faces[index])
    if face is None:
        return f"no face in {'the image' if name == 'images' else f'{name} image {index}'} ({judge.backend})"
    single = replace(analysis, faces=[[face]], image_sizes=[analysis.image_sizes[index]], notes=[])
    return align_faces(ctx.inputs.batch(name)[index:index + 1], single, CROP_SIZE).crops[0]


def psnr_ssim(ctx: MetricContext) -> list[dict]:
    rows = []
    for index in range(ctx.inputs.count):
        generated = aligned_crop(ctx, "images", index)
        reference = aligned_crop(ctx, "references", ctx.inputs.paired_index("references", index))
        problem = next((v for v in (generated, reference) if isinstance(v, str)), None)
        if problem is not None:
            rows.append({"psnr": problem, "ssim": problem})
        else:
            rows.append({"psnr": psnr(generated, reference), "ssim": ssim(generated, reference)})
    return rows


def outside_mask_change(generated: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> tuple[float, float] | str:
    """(mean absolute difference, PSNR) of ``[H,W,3]`` images where ``mask`` ``[H,W]`` < 0.5, or why not."""
    if generated.shape != source.shape:
        return (f"the source is {source.shape[1]}x{source.shape[0]} but the image is {generated.shape[1]}x"
                f"{generated.shape[0]}; compare at one size")
    if mask.shape != generated.shape[:2]:
        return f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is {generated.shape[1]}x{generated.shape[0]}"
    outside = mask < OUTSIDE_THRESHOLD
    if not bool(outside.any()):
        return "the mask covers the whole image"
    a, b = generated[outside].double(), source[outside].double()
    return float((a - b).abs().mean()), psnr(a, b)


def outside_mask(ctx: MetricContext) -> list[dict]:
    inputs = ctx.inputs
    rows = []
    for index in range(inputs.count):
        source = inputs.batch("sources")[inputs.paired_index("sources", index)]
        mask = inputs.masks[0 if inputs.masks.shape[0] == 1 else index]
        change = outside_mask_change(inputs.images[index], source, mask)
        if isinstance(change, str):
            rows.append({"outside_mad": change, "outside_psnr": change})
        else:
            rows.append({"outside_mad": change[0], "outside_psnr": change[1]})
    return rows
