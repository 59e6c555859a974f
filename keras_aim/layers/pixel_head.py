"""The pixel prediction head used during AIM pre-training (then discarded)."""

from __future__ import annotations

import keras
from keras import ops

from keras_aim.layers.mlp import AIMMLP
from keras_aim.layers.position_embedding import sincos_2d_position_embedding
from keras_aim.layers.remat import make_blocks
from keras_aim.utils.arguments import check_positive_ints


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMPixelHeadBlock(keras.layers.Layer):
    """`x = x + norm_1(x); x = x + mlp(norm_2(x))`: a transformer block whose
    attention is the identity. `(B, N, width)` -> `(B, N, width)`."""

    def __init__(self, width: int, mlp_ratio: float, layer_norm_epsilon: float, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.mlp_ratio = mlp_ratio
        self.layer_norm_epsilon = layer_norm_epsilon
        self.norm_1 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm_1"
        )
        self.norm_2 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm_2"
        )
        self.mlp = AIMMLP(
            width, int(width * mlp_ratio), dtype=self.dtype_policy, name="mlp"
        )

    def build(self, input_shape):
        for layer in (self.norm_1, self.norm_2, self.mlp):
            layer.build(input_shape)
        self.built = True

    def call(self, x):
        x = x + self.norm_1(x)
        return x + self.mlp(self.norm_2(x))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "width": self.width,
                "mlp_ratio": self.mlp_ratio,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMPixelHead(keras.layers.Layer):
    """Maps trunk tokens to the pixels of the next patch.

    `Dense(D -> width, bias)` -> + 2-D sin-cos position embedding (width) ->
    `depth` blocks of `x = x + LN1(x); x = x + MLP(LN2(x))` (the training
    code's block with attention replaced by identity) -> LayerNorm ->
    `Dense(width -> p*p*C, bias)`, the last one initialized truncated-normal
    fan-in with scale 1/13.

    Args:
        patch_size: p.
        num_channels: C.
        width: head width (2048 in the paper).
        depth: number of blocks (12 in the paper).
        mlp_ratio: MLP hidden width as a multiple of `width`.
        layer_norm_epsilon: LayerNorm epsilon (1e-5 in the training code).
        remat: recompute each block in the backward pass instead of storing
            its activations.

    Call arguments:
        tokens: `(B, N, D)` post_trunk_norm tokens in raster order.
        grid: `(rows, cols)` of the patch grid, `rows * cols = N`; a square
            grid is assumed when omitted.

    Returns:
        `(B, N, p*p*C)` predictions; position k predicts patch k+1.
    """

    def __init__(
        self,
        patch_size: int,
        num_channels: int = 3,
        width: int = 2048,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        layer_norm_epsilon: float = 1e-5,
        remat: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_ints(type(self).__name__, patch_size=patch_size,
                            num_channels=num_channels, width=width, depth=depth)
        self.remat = remat
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.width = width
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        self.layer_norm_epsilon = layer_norm_epsilon

        self.input_proj = keras.layers.Dense(
            width, dtype=self.dtype_policy, name="input_proj"
        )
        self.blocks = make_blocks(
            depth,
            remat,
            lambda name: AIMPixelHeadBlock(
                width, mlp_ratio, layer_norm_epsilon, dtype=self.dtype_policy, name=name
            ),
        )
        self.final_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="final_norm"
        )
        self.output_proj = keras.layers.Dense(
            patch_size * patch_size * num_channels,
            kernel_initializer=keras.initializers.VarianceScaling(
                scale=1.0 / 13, mode="fan_in", distribution="truncated_normal"
            ),
            dtype=self.dtype_policy,
            name="output_proj",
        )

    def build(self, input_shape):
        self.input_proj.build(input_shape)
        hidden_shape = (*input_shape[:-1], self.width)
        for block in self.blocks:
            block.build(hidden_shape)
        self.final_norm.build(hidden_shape)
        self.output_proj.build(hidden_shape)
        self.built = True

    def call(self, tokens, grid=None):
        x = self.input_proj(tokens)
        if grid is None:
            side = int(round(tokens.shape[1] ** 0.5))
            grid = (side, side)
        position = sincos_2d_position_embedding(*grid, self.width, dtype=x.dtype)
        x = x + ops.reshape(position, (1, grid[0] * grid[1], self.width))
        for block in self.blocks:
            x = block(x)
        return self.output_proj(self.final_norm(x))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.patch_size**2 * self.num_channels)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "patch_size": self.patch_size,
                "num_channels": self.num_channels,
                "width": self.width,
                "depth": self.depth,
                "mlp_ratio": self.mlp_ratio,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "remat": self.remat,
            }
        )
        return config
