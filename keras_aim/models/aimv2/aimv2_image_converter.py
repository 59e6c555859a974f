"""AIMv2 evaluation preprocessing (a keras-hub `ImageConverter`).

Two pipelines exist for AIMv2 and they disagree:

- `"clip"` (the presets' default): what the Hub repositories'
  `preprocessor_config.json` (CLIPImageProcessor) and timm's `apple_pt`
  configs do: shorter side to the model size, bicubic, center crop (no
  0.875 margin), OpenAI CLIP mean/std. Two independent consumers of the
  weights agree on it, and the LiT model's text tower was trained against
  CLIP-normalized images.
- `"apple"`: the example in Apple's README, which reuses AIM-v1's ImageNet
  transform: shorter side to `size / 0.875` (256 / 384 / 512), center crop,
  ImageNet mean/std.

Which one produced the README's ImageNet numbers is not stated by Apple.
For the native-resolution model (`image_size=None`) nothing is resized or
cropped; pixels are only scaled and normalized.
"""

from __future__ import annotations

import keras

from keras_aim.models.aim.aim_image_converter import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AIMImageConverter,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# pipeline -> (mean, std, crop fraction)
PIPELINES = {
    "clip": (CLIP_MEAN, CLIP_STD, 1.0),
    "apple": (IMAGENET_MEAN, IMAGENET_STD, 0.875),
}


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMv2ImageConverter(AIMImageConverter):
    """Resize the shorter side, center crop `image_size`, scale to [0, 1],
    normalize: AIMv2's evaluation transform.

    Input: uint8 or float images in [0, 255], `(H, W, 3)` or `(B, H, W, 3)`.
    Output: float `(..., image_size[0], image_size[1], 3)`, or the input's
    size when `image_size` is `None` (the native-resolution model).

    Args:
        image_size: `(height, width)` of the center crop; `None` for no
            resize and no crop.
        pipeline: `"clip"` (default; shorter side to the crop size, CLIP
            mean/std) or `"apple"` (shorter side to size / 0.875, ImageNet
            mean/std). See the module docstring.
        resize_size, scale, offset: override the pipeline's values (as in
            `AIMImageConverter`).
    """

    def __init__(
        self,
        image_size=(224, 224),
        pipeline: str = "clip",
        resize_size: int | None = None,
        scale=None,
        offset=None,
        **kwargs,
    ):
        if pipeline not in PIPELINES:
            raise ValueError(
                f"pipeline must be one of {tuple(PIPELINES)}; received {pipeline!r}."
            )
        mean, std, crop_fraction = PIPELINES[pipeline]
        if scale is None and offset is None:
            scale = [1.0 / (255.0 * s) for s in std]
            offset = [-m / s for m, s in zip(mean, std)]
        if resize_size is None and image_size is not None:
            resize_size = round(min(image_size) / crop_fraction)
        super().__init__(
            image_size=image_size,
            resize_size=resize_size,
            scale=scale,
            offset=offset,
            **kwargs,
        )
        self.pipeline = pipeline

    def get_config(self):
        config = super().get_config()
        config["pipeline"] = self.pipeline
        return config
