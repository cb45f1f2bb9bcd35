"""How data meets the model (image, clip, step): one object per modality (``base.Modality``, found with
``registry.lookup``) holding its data resolution, sampler, loss, evaluation, calibration feeds and the key of its
validate driver."""
