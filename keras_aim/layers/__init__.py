"""AIM and AIMv2 building blocks, written with `keras.ops` only (any backend)."""

from keras_aim.layers.attention import (
    AIMAttention,
    AIMFusedQKV,
    AIMPrefixSampler,
    prefix_causal_mask,
)
from keras_aim.layers.attention_probe import AIMAttentionProbe
from keras_aim.layers.mlp import AIMMLP, AIMSwiGLUMLP
from keras_aim.layers.patch_embedding import AIMPatchEmbedding
from keras_aim.layers.pixel_head import AIMPixelHead, AIMPixelHeadBlock
from keras_aim.layers.position_embedding import (
    AIMLearnedPositionEmbedding,
    AIMSinCosPositionEmbedding,
    bicubic_resize_weights,
    sincos_2d_position_embedding,
)
from keras_aim.layers.transformer_block import (
    AIMTransformerBlock,
    AIMv2TransformerBlock,
)

__all__ = [
    "AIMAttention",
    "AIMAttentionProbe",
    "AIMFusedQKV",
    "AIMLearnedPositionEmbedding",
    "AIMMLP",
    "AIMPatchEmbedding",
    "AIMPixelHead",
    "AIMPixelHeadBlock",
    "AIMPrefixSampler",
    "AIMSinCosPositionEmbedding",
    "AIMSwiGLUMLP",
    "AIMTransformerBlock",
    "AIMv2TransformerBlock",
    "bicubic_resize_weights",
    "prefix_causal_mask",
    "sincos_2d_position_embedding",
]
