"""Images and video clips, LR generation, patch/clip sampling and SR metrics."""

from sls_deploy.data.images import bicubic_down, bicubic_up, load_pair, quantize, read_rgb, to_image, to_tensor
from sls_deploy.data.metrics import psnr, rgb_to_y, ssim
from sls_deploy.data.patches import PatchSampler
from sls_deploy.data.sources import BUILTIN_LISTS, resolve_images
from sls_deploy.data.video import BUILTIN_CLIP_LISTS, ClipSampler, ClipSource, load_clip_pair, read_frames, resolve_clips

__all__ = ["BUILTIN_CLIP_LISTS", "BUILTIN_LISTS", "ClipSampler", "ClipSource", "PatchSampler", "bicubic_down",
           "bicubic_up", "load_clip_pair", "load_pair", "psnr", "quantize", "read_frames", "read_rgb",
           "resolve_clips", "resolve_images", "rgb_to_y", "ssim", "to_image", "to_tensor"]
