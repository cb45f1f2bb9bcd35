"""Images and video clips, LR generation, patch/clip sampling and SR metrics."""

from .images import bicubic_down, bicubic_up, load_pair, quantize, read_rgb, to_image, to_tensor
from .metrics import psnr, rgb_to_y, ssim
from .patches import PatchSampler
from .sources import BUILTIN_LISTS, resolve_images
from .video import BUILTIN_CLIP_LISTS, ClipSampler, ClipSource, load_clip_pair, read_frames, resolve_clips

__all__ = ["BUILTIN_CLIP_LISTS", "BUILTIN_LISTS", "ClipSampler", "ClipSource", "PatchSampler", "bicubic_down",
           "bicubic_up", "load_clip_pair", "load_pair", "psnr", "quantize", "read_frames", "read_rgb",
           "resolve_clips", "resolve_images", "rgb_to_y", "ssim", "to_image", "to_tensor"]
