"""The AIMv2 LiT image-text model (`aimv2_large_patch14_224_lit`).

    image (B, 224, 224, 3) -> AIMv2Backbone tokens (B, 256, 1024)
        -> attention pool (one learned query, 8 heads, biased linear)
        -> image projection -> image embedding (B, 768)
    token_ids (B, T <= 77) -> token + position tables -> 12 causal blocks
        -> final RMSNorm -> the token at the first end token
        -> text projection -> text embedding (B, 768)
    logits_per_image = s * normalize(image) @ normalize(text).T,
        s = exp(clip(log_logit_scale, 0, log 100))

`zero_shot_classifier(model, class_names, templates, tokenizer)` turns it
into an image classifier over any class names.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np
from keras import ops
from keras_hub.layers import TokenAndPositionEmbedding
from keras_hub.models import Backbone

from keras_aim.layers import AIMAttentionProbe, AIMv2TransformerBlock
from keras_aim.layers.remat import make_blocks
from keras_aim.loading.lean_loading import zeros_while_loading
from keras_aim.loading.strict_weights import StrictWeights
from keras_aim.models.aimv2 import aimv2_presets
from keras_aim.models.aimv2.aimv2_backbone import (
    AIMv2Backbone,
    from_release,
    keras_hub_preset,
)
from keras_aim.models.aimv2.aimv2_image_converter import AIMv2ImageConverter
from keras_aim.models.aimv2.aimv2_tokenizer import AIMv2Tokenizer
from keras_aim.utils.class_properties import classproperty

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def first_end_token(tokens, token_ids, end_token_id: int):
    """`tokens[b, i]` at the first `i` with `token_ids[b, i] ==
    end_token_id` (position 0 for a row without one): `(B, T, D) -> (B, D)`."""
    is_end = ops.cast(ops.equal(token_ids, end_token_id), "int32")
    index = ops.argmax(is_end, axis=1)  # the first maximum; 0 if none
    positions = ops.arange(ops.shape(token_ids)[1])
    tokens = ops.convert_to_tensor(tokens)
    picked = ops.cast(ops.equal(positions[None, :], index[:, None]), tokens.dtype)
    return ops.sum(ops.multiply(tokens, picked[:, :, None]), axis=1)


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMv2EndTokenPooling(keras.layers.Layer):
    """`first_end_token` as a layer: `(tokens (B, T, D), token_ids (B, T))
    -> (B, D)`."""

    def __init__(self, end_token_id: int, **kwargs):
        super().__init__(**kwargs)
        self.end_token_id = end_token_id

    def call(self, tokens, token_ids):
        return first_end_token(tokens, token_ids, self.end_token_id)

    def compute_output_shape(self, tokens_shape, token_ids_shape):
        return (tokens_shape[0], tokens_shape[2])

    def get_config(self):
        config = super().get_config()
        config["end_token_id"] = self.end_token_id
        return config


def _concrete(values):
    """`values` as a NumPy array, or `None` when they are symbolic (a traced
    function or graph: then they cannot be checked here)."""
    if isinstance(values, (np.ndarray, list, tuple)):
        return np.asarray(values)
    if isinstance(values, keras.KerasTensor):
        return None
    try:
        return np.asarray(ops.convert_to_numpy(values))
    except Exception:  # tracers and graph tensors of every backend
        return None


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMv2TextEncoder(Backbone):
    """The LiT text tower: token and learned position tables, causal
    pre-norm blocks (RMSNorm, fused qkv, SwiGLU), a final RMSNorm.

    token_ids `(B, T)`, `T <= sequence_length` -> `(B, T, D)` tokens. The
    text embedding is the token at the first `end_token_id`
    (`first_end_token`); padding after it, with any id, changes nothing.

    Args:
        vocabulary_size: token ids are `0 .. vocabulary_size - 1`.
        sequence_length: the longest input (the position table's rows).
        hidden_dim, num_layers, num_heads, intermediate_dim: the blocks.
        end_token_id: the id whose first occurrence is pooled.
        norm_epsilon: RMSNorm epsilon (1e-5).
        remat: recompute each block in the backward pass.
        dtype: dtype policy.
    """

    def __init__(
        self,
        vocabulary_size: int = 49408,
        sequence_length: int = 77,
        hidden_dim: int = 768,
        num_layers: int = 12,
        num_heads: int = 6,
        intermediate_dim: int = 2048,
        end_token_id: int = 49407,
        norm_epsilon: float = 1e-5,
        remat: bool = False,
        dtype=None,
        **kwargs,
    ):
        if not 0 <= end_token_id < vocabulary_size:
            raise ValueError(
                f"end_token_id={end_token_id} is outside the vocabulary "
                f"(0..{vocabulary_size - 1})."
            )
        # === Layers ===
        self.embedding = TokenAndPositionEmbedding(
            vocabulary_size, sequence_length, hidden_dim, dtype=dtype, name="embedding"
        )
        self.blocks = make_blocks(
            num_layers,
            remat,
            lambda name: AIMv2TransformerBlock(
                hidden_dim, num_heads, intermediate_dim, norm_epsilon,
                causal=True, dtype=dtype, name=name,
            ),
        )
        self.post_trunk_norm = keras.layers.RMSNormalization(
            epsilon=norm_epsilon, dtype=dtype, name="post_trunk_norm"
        )
        self.end_token_pooling = AIMv2EndTokenPooling(
            end_token_id, dtype=dtype, name="end_token_pooling"
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.sequence_length = sequence_length
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.end_token_id = end_token_id
        self.norm_epsilon = norm_epsilon
        self.remat = remat

        # === Functional Model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        with zeros_while_loading([*self.blocks, self.post_trunk_norm]):
            tokens, _ = self._run(token_ids, ())
        super().__init__(inputs=token_ids, outputs=tokens, dtype=dtype, **kwargs)

    def _run(self, token_ids, block_indices, final_norm: bool = True):
        x = self.embedding(token_ids)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return (self.post_trunk_norm(x) if final_norm else None), [
            outputs[i] for i in block_indices
        ]

    def check_token_ids(self, token_ids) -> None:
        """Raises a `ValueError` naming the problem unless `token_ids` is
        `(B, T)` with `T <= sequence_length` and (when concrete) every id in
        the vocabulary."""
        shape = tuple(token_ids.shape)
        where = type(self).__name__
        if len(shape) != 2:
            raise ValueError(
                f"{where} expects token ids of shape (batch, length); received "
                f"shape {shape}. Pack texts with AIMv2Tokenizer.pack()."
            )
        if shape[1] is not None and shape[1] > self.sequence_length:
            raise ValueError(
                f"{where} takes at most {self.sequence_length} tokens; received "
                f"{shape[1]}. Pack the texts with truncation "
                "(AIMv2Tokenizer.pack(texts, truncate=True)) or shorten them."
            )
        values = _concrete(token_ids)
        if values is None or values.size == 0:
            return
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{where} expects integer token ids; received {values.dtype}.")
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= self.vocabulary_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"Token id {bad} is outside the vocabulary of {where} (ids 0.."
                f"{self.vocabulary_size - 1}). Use the model's own tokenizer "
                "(AIMv2Tokenizer.from_preset of the same preset)."
            )

    def __call__(self, token_ids, *args, **kwargs):
        if hasattr(token_ids, "shape"):
            self.check_token_ids(token_ids)
        return super().__call__(token_ids, *args, **kwargs)

    def block_outputs(self, token_ids, indices: Sequence[int] | None = None):
        """Outputs of blocks (before the final norm), `(B, T, D)` each."""
        self.check_token_ids(token_ids)
        indices = list(range(self.num_layers)) if indices is None else list(indices)
        _, outputs = self._run(token_ids, indices, final_norm=False)
        return outputs

    def pool(self, tokens, token_ids):
        """The text embedding before projection: `(B, T, D) -> (B, D)`."""
        return self.end_token_pooling(tokens, token_ids)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "sequence_length": self.sequence_length,
                "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "end_token_id": self.end_token_id,
                "norm_epsilon": self.norm_epsilon,
                "remat": self.remat,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMv2LogitScale(keras.layers.Layer):
    """Similarity logits of two embedding sets, with the learned temperature.

    Holds `log_logit_scale` (a scalar, initially `log(1 / 0.07)`); the scale
    is `exp(clip(log_logit_scale, 0, log(max_logit_scale)))`.

    Call arguments:
        image_embeddings: `(B_img, P)`; text_embeddings: `(B_txt, P)`
        (unnormalized; both are L2-normalized here).

    Returns:
        `logits_per_image` `(B_img, B_txt)`.
    """

    def __init__(self, max_logit_scale: float = 100.0, **kwargs):
        super().__init__(**kwargs)
        self.max_logit_scale = max_logit_scale

    def build(self, image_embeddings_shape=None, text_embeddings_shape=None):
        self.log_logit_scale = self.add_weight(
            name="log_logit_scale",
            shape=(),
            initializer=keras.initializers.Constant(math.log(1 / 0.07)),
        )
        self.built = True

    def scale(self):
        """The clamped scale `s`."""
        log_scale = ops.cast(self.log_logit_scale, "float32")
        return ops.exp(ops.clip(log_scale, 0.0, math.log(self.max_logit_scale)))

    def call(self, image_embeddings, text_embeddings):
        image = ops.normalize(ops.cast(image_embeddings, "float32"), axis=-1)
        text = ops.normalize(ops.cast(text_embeddings, "float32"), axis=-1)
        return self.scale() * ops.matmul(image, ops.transpose(text))

    def compute_output_shape(self, image_embeddings_shape, text_embeddings_shape):
        return (image_embeddings_shape[0], text_embeddings_shape[0])

    def get_config(self):
        config = super().get_config()
        config["max_logit_scale"] = self.max_logit_scale
        return config


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMv2LiT(StrictWeights, Backbone):
    """AIMv2 LiT: an AIMv2 image tower and a causal text tower aligned in
    one embedding space (zero-shot classification, retrieval).

    Inputs `{"images": (B_img, H, W, 3), "token_ids": (B_txt, T)}` ->
    `{"logits_per_image": (B_img, B_txt), "logits_per_text": (B_txt, B_img)}`.
    `encode_image` / `encode_text` give the unnormalized projected
    embeddings; `zero_shot_classifier` builds a classifier from class names.

    Args:
        vision_encoder: an `AIMv2Backbone` (fixed size).
        text_encoder: an `AIMv2TextEncoder`.
        projection_dim: width of the shared embedding space.
        pool_num_heads: heads of the image attention pool (Apple's code
            uses the vision encoder's).
        max_logit_scale: the clamp of the learned logit scale.
        dtype: dtype policy of the heads.

    Example:
    ```python
    lit = keras_aim.AIMv2LiT.from_preset("aimv2_large_patch14_224_lit")
    tokenizer = keras_aim.AIMv2Tokenizer.from_preset("aimv2_large_patch14_224_lit")
    classifier = keras_aim.zero_shot_classifier(lit, ["cat", "dog"], tokenizer=tokenizer)
    ```
    """

    def __init__(
        self,
        vision_encoder: AIMv2Backbone,
        text_encoder: AIMv2TextEncoder,
        projection_dim: int = 768,
        pool_num_heads: int | None = None,
        max_logit_scale: float = 100.0,
        dtype=None,
        **kwargs,
    ):
        width = vision_encoder.hidden_dim
        pool_num_heads = pool_num_heads or vision_encoder.num_heads
        # === Layers ===
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        self.image_pool = AIMAttentionProbe(
            width, width, pool_num_heads, use_batch_norm=False, use_bias=True,
            dtype=dtype, name="image_pool",
        )
        self.image_projection = keras.layers.Dense(
            projection_dim, use_bias=False, dtype=dtype, name="image_projection"
        )
        self.text_projection = keras.layers.Dense(
            projection_dim, use_bias=False, dtype=dtype, name="text_projection"
        )
        self.logit_scale = AIMv2LogitScale(
            max_logit_scale, dtype=dtype, name="logit_scale"
        )

        # === Config ===
        self.projection_dim = projection_dim
        self.pool_num_heads = pool_num_heads
        self.max_logit_scale = max_logit_scale

        # === Functional Model ===
        images = keras.Input(shape=vision_encoder.image_shape, name="images")
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        heads = [self.image_pool, self.image_projection, self.text_projection]
        with zeros_while_loading(heads):
            logits = self.logit_scale(
                self._image_embedding(images), self._text_embedding(token_ids)
            )
        super().__init__(
            inputs={"images": images, "token_ids": token_ids},
            outputs={
                "logits_per_image": logits,
                "logits_per_text": ops.transpose(logits),
            },
            dtype=dtype,
            **kwargs,
        )

    def _image_embedding(self, images):
        return self.image_projection(self.image_pool(self.vision_encoder(images)))

    def _text_embedding(self, token_ids):
        tokens = self.text_encoder(token_ids)
        return self.text_projection(self.text_encoder.pool(tokens, token_ids))

    def encode_image(self, images):
        """Unnormalized image embeddings `(B, projection_dim)` of
        preprocessed images (`AIMv2ImageConverter`) at the model's size."""
        return self._image_embedding(images)

    def encode_text(self, token_ids):
        """Unnormalized text embeddings `(B, projection_dim)` of packed
        token ids (`AIMv2Tokenizer.pack`)."""
        return self._text_embedding(token_ids)

    def similarity(self, images, token_ids):
        """`(logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img))`."""
        logits = self.logit_scale(self.encode_image(images), self.encode_text(token_ids))
        return logits, ops.transpose(logits)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vision_encoder": keras.layers.serialize(self.vision_encoder),
                "text_encoder": keras.layers.serialize(self.text_encoder),
                "projection_dim": self.projection_dim,
                "pool_num_heads": self.pool_num_heads,
                "max_logit_scale": self.max_logit_scale,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for part in ("vision_encoder", "text_encoder"):
            if isinstance(config[part], dict):
                sub = dict(config[part])
                if config.get("dtype") is not None:  # one policy for the towers
                    sub["config"] = {**sub["config"], "dtype": config["dtype"]}
                config[part] = keras.layers.deserialize(sub, custom_objects=custom_objects)
        return cls(**config)

    @classproperty
    def presets(cls) -> dict:
        """The released LiT model, in keras-hub's format
        (`aimv2_presets.listing("lit")`)."""
        return aimv2_presets.listing("lit")

    @classmethod
    def from_preset(cls, preset: str, load_weights: bool = True, checkpoint=None,
                    allow_partial: bool = False, **kwargs):
        """The LiT model of preset `aimv2_large_patch14_224_lit` (the
        release downloaded at its pinned revision, checked, converted and
        cached on first use), of a local keras-hub preset directory or a
        handle. `checkpoint`: a local checkpoint (Apple's or transformers'
        names) to load instead of the release. `dtype` may be given.
        `allow_partial` as in `AIMv2Backbone.from_preset`."""
        if not aimv2_presets.is_preset_name(preset):
            return keras_hub_preset(
                super().from_preset, preset, load_weights, allow_partial, **kwargs
            )
        return from_release(
            cls, preset, "lit", _lit_from_table, load_weights, checkpoint, **kwargs
        )

    @classmethod
    def release_preprocessors(cls, name: str, progress: bool = True) -> list:
        """What the cached LiT preset holds besides the model: the image
        converter and the tokenizer (with the release's vocabulary)."""
        size = aimv2_presets.get_preset(name)["image_size"]
        return [
            AIMv2LiTImageConverter(image_size=(size, size)),
            AIMv2Tokenizer.from_preset(name),
        ]


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMv2LiTImageConverter(AIMv2ImageConverter):
    """`AIMv2ImageConverter` of a LiT preset (keras-hub finds a preset's
    converter class by the preset's backbone class)."""


AIMv2LiTImageConverter.backbone_cls = AIMv2LiT
AIMv2Tokenizer.backbone_cls = AIMv2LiT


def _lit_from_table(entry: dict, dtype=None) -> AIMv2LiT:
    """The LiT model of a presets-table entry, without weights."""
    return AIMv2LiT(
        AIMv2Backbone(**entry["config"], dtype=dtype, name="vision_encoder"),
        AIMv2TextEncoder(**entry["text_config"], dtype=dtype, name="text_encoder"),
        projection_dim=entry["projection_dim"],
        pool_num_heads=entry["pool_num_heads"],
        max_logit_scale=entry["max_logit_scale"],
        dtype=dtype,
    )


def class_text_embeddings(model: AIMv2LiT, token_ids_per_class, batch_size: int = 256):
    """L2-normalized class embeddings `(C, P)`: for each class, the mean of
    its prompts' normalized text embeddings, normalized again (CLIP's
    prompt ensembling).

    Args:
        token_ids_per_class: per class, an int array `(num_prompts, T)`.
    """
    embeddings = []
    for token_ids in token_ids_per_class:
        token_ids = np.asarray(token_ids, "int32")
        parts = [
            ops.convert_to_numpy(ops.cast(
                model.encode_text(token_ids[start : start + batch_size]), "float32"
            ))
            for start in range(0, len(token_ids), batch_size)
        ]
        prompts = np.concatenate(parts)
        prompts = prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)
        mean = prompts.mean(axis=0)
        embeddings.append(mean / np.linalg.norm(mean))
    return np.stack(embeddings)


def zero_shot_classifier(
    model: AIMv2LiT,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    tokenizer: AIMv2Tokenizer | None = None,
    class_token_ids=None,
) -> keras.Model:
    """A Keras image classifier over `class_names`, from a LiT model.

    Each class's prompts are `template.format(name)` for every template;
    its embedding is the normalized mean of the prompts' normalized text
    embeddings. The classifier maps preprocessed images `(B, H, W, 3)` to
    logits `(B, C) = s * normalize(image embedding) @ class embeddings.T`
    (softmax them for probabilities): a plain functional `keras.Model` of
    the LiT's image tower, a `UnitNormalization` and a frozen `Dense`
    holding the scaled class embeddings, so it saves, loads and exports as
    any Keras model.

    Args:
        model: an `AIMv2LiT`.
        class_names: the classes; needs `tokenizer`.
        templates: prompt templates with one `{}` each.
        tokenizer: an `AIMv2Tokenizer` (from the same preset).
        class_token_ids: instead of names: per class, packed token ids
            `(num_prompts, T)`.
    """
    if class_token_ids is None:
        if not class_names or tokenizer is None:
            raise ValueError(
                "zero_shot_classifier needs class_names and the model's tokenizer "
                "(or class_token_ids)."
            )
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(
                f"Each template needs exactly one '{{}}' for the class name; "
                f"received {list(templates)!r}."
            )
        names = [str(n).strip() for n in class_names]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(
                f"Class names must be non-empty and distinct; received {list(class_names)!r}."
            )
        class_token_ids = [
            tokenizer.pack([t.format(name) for t in templates],
                           model.text_encoder.sequence_length)
            for name in names
        ]
    classes = class_text_embeddings(model, class_token_ids)
    scale = float(ops.convert_to_numpy(model.logit_scale.scale()))
    images = keras.Input(shape=model.vision_encoder.image_shape, name="images")
    embedding = keras.layers.UnitNormalization(dtype="float32", name="normalize")(
        model.encode_image(images)
    )
    head = keras.layers.Dense(
        len(classes), use_bias=False, trainable=False, dtype="float32", name="classes"
    )
    logits = head(embedding)
    head.kernel.assign((scale * classes.T).astype("float32"))
    return keras.Model(images, logits, name="zero_shot_classifier")
