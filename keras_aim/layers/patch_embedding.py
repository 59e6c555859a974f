"""Patch embedding: a strided convolution (with bias) followed by a norm
(LayerNorm in AIM-v1, RMSNorm in AIMv2)."""

from __future__ import annotations

import keras

from keras_aim.utils.arguments import check_positive_ints

NORMALIZATIONS = {
    "layer_norm": keras.layers.LayerNormalization,
    "rms_norm": keras.layers.RMSNormalization,
}


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMPatchEmbedding(keras.layers.Layer):
    """Cuts images into `patch_size` squares and projects each to `hidden_dim`.

    Matches the released `preprocessor.patchifier`: `Conv2D(hidden_dim,
    kernel=stride=patch_size, bias)` then `LayerNorm(hidden_dim)`.

    Args:
        hidden_dim: output width D.
        patch_size: side p of the square patches.
        layer_norm_epsilon: epsilon of the norm.
        normalization: `"layer_norm"` (AIM-v1) or `"rms_norm"` (AIMv2: scale
            only, no bias).

    Call arguments:
        images: `(batch, height, width, channels)`, height and width multiples
            of `patch_size`.

    Returns:
        `(batch, height / p, width / p, hidden_dim)` normalized patch tokens.
    """

    def __init__(
        self,
        hidden_dim: int,
        patch_size: int,
        layer_norm_epsilon: float = 1e-6,
        normalization: str = "layer_norm",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_ints(type(self).__name__, hidden_dim=hidden_dim, patch_size=patch_size)
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {tuple(NORMALIZATIONS)}; "
                f"received {normalization!r}."
            )
        self.hidden_dim = hidden_dim
        self.patch_size = patch_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.normalization = normalization
        self.proj = keras.layers.Conv2D(
            hidden_dim,
            kernel_size=patch_size,
            strides=patch_size,
            padding="valid",
            use_bias=True,
            kernel_initializer="glorot_uniform",
            data_format="channels_last",
            dtype=self.dtype_policy,
            # Not "proj": keras-hub's enable_lora matches attention "proj".
            name="conv",
        )
        self.norm = NORMALIZATIONS[normalization](
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm"
        )

    def build(self, input_shape):
        # Xavier-uniform over the kernel viewed as a (p*p*C, D) matrix, as in
        # the released training code; Keras' glorot would count the receptive
        # field in both fans.
        fan_in = self.patch_size**2 * input_shape[-1]
        receptive = self.patch_size**2
        self.proj.kernel_initializer = keras.initializers.VarianceScaling(
            scale=(fan_in + receptive * self.hidden_dim)
            / (fan_in + self.hidden_dim),
            mode="fan_avg",
            distribution="uniform",
        )
        self.proj.build(input_shape)
        self.norm.build(self.proj.compute_output_shape(input_shape))
        self.built = True

    def call(self, images):
        return self.norm(self.proj(images))

    def compute_output_shape(self, input_shape):
        """`(B, H, W, C)` -> `(B, H / p, W / p, hidden_dim)`."""
        if input_shape is None or len(input_shape) != 4:
            raise ValueError(
                "AIMPatchEmbedding takes images of shape (batch, height, "
                f"width, channels); received shape {input_shape}."
            )
        return self.proj.compute_output_shape(tuple(input_shape))

    def compute_output_spec(self, images):
        """The output's `KerasTensor` for `images` of any kind with a shape.

        Keras derives the spec from `compute_output_shape` only for backend
        tensors and `KerasTensor`s; a functional model's
        `compute_output_spec(numpy_images)` hands this first layer the NumPy
        array itself, whose shape Keras would then read as `None`.
        """
        return keras.KerasTensor(
            self.compute_output_shape(tuple(images.shape)), dtype=self.compute_dtype
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "patch_size": self.patch_size,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "normalization": self.normalization,
            }
        )
        return config
