"""`sls-deploy upscale`: run a deployed bundle on users' images and videos (tiled, bounded memory)."""
