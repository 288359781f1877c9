"""Pixel statistics the encoders were trained with: one home for the constants that preprocessing (data/), the
model's re-normalisation for SAM (models/) and the PyTorch export (convert/) all need."""

# CLIP (ViT and ConvNeXt): mean and std of RGB on the 0–1 scale.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SAM: mean and std of RGB on the 0–255 scale.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
