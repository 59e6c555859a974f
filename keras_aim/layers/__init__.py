"""AIM building blocks, written with `keras.ops` only (any backend)."""

from keras_aim.layers.attention import (
    AIMAttention,
    AIMFusedQKV,
    AIMPrefixSampler,
    prefix_causal_mask,
)
from keras_aim.layers.attention_probe import AIMAttentionProbe
from keras_aim.layers.mlp import AIMMLP
from keras_aim.layers.patch_embedding import AIMPatchEmbedding
from keras_aim.layers.pixel_head import AIMPixelHead, AIMPixelHeadBlock
from keras_aim.layers.position_embedding import (
    AIMSinCosPositionEmbedding,
    sincos_2d_position_embedding,
)
from keras_aim.layers.transformer_block import AIMTransformerBlock

__all__ = [
    "AIMAttention",
    "AIMAttentionProbe",
    "AIMFusedQKV",
    "AIMMLP",
    "AIMPatchEmbedding",
    "AIMPixelHead",
    "AIMPixelHeadBlock",
    "AIMPrefixSampler",
    "AIMSinCosPositionEmbedding",
    "AIMTransformerBlock",
    "prefix_causal_mask",
    "sincos_2d_position_embedding",
]
