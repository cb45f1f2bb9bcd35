"""Images, LR generation, patch sampling and SR metrics."""

from .images import bicubic_down, bicubic_up, load_pair, quantize, read_rgb, to_image, to_tensor
from .metrics import psnr, rgb_to_y, ssim
from .patches import PatchSampler
from .sources import BUILTIN_LISTS, resolve_images

__all__ = ["BUILTIN_LISTS", "PatchSampler", "bicubic_down", "bicubic_up", "load_pair", "psnr", "quantize",
           "read_rgb", "resolve_images", "rgb_to_y", "ssim", "to_image", "to_tensor"]
