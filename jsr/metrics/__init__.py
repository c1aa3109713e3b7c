"""Image quality metrics. Images are NHWC in [0, 1] at every function here.

Fidelity: :func:`psnr`, :func:`ssim` (Y channel by default, as SR papers report them).
Perceptual: :func:`lpips_distance` (LPIPS-VGG, also a training loss), :func:`dists_distance` (DISTS).
Weight files: :mod:`jsr.metrics.files` finds them where the PyTorch packages keep them (``python -m jsr.metrics
files`` lists each, found or missing, and how to get it).
"""

from jsr.metrics.color import rgb_to_y
from jsr.metrics.dists import DISTS, dists_distance, dists_params_from_torch, load_dists_params, save_dists_weights
from jsr.metrics.lpips import LPIPS, load_lpips_params, lpips_distance, lpips_params_from_torch, save_lpips_weights
from jsr.metrics.psnr_ssim import psnr, quantize_8bit, ssim
from jsr.metrics.vgg import VGG16Features

__all__ = [
    "DISTS", "LPIPS", "VGG16Features", "dists_distance", "dists_params_from_torch", "load_dists_params",
    "load_lpips_params", "lpips_distance", "lpips_params_from_torch", "psnr", "quantize_8bit", "rgb_to_y",
    "save_dists_weights", "save_lpips_weights", "ssim",
]
