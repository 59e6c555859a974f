"""SavedModel export for TensorFlow Serving, from any backend.

`export_saved_model(model, export_dir)` writes TF Serving's layout
(`export_dir/<version>/saved_model.pb` + `variables/`) with three
signatures, the evaluation preprocessing inside the graph:

- `serving_default`: `images` uint8 `(B, H, W, 3)`, any H and W.
- `predict_images`: `image_bytes` string `(B,)`, encoded JPEG, PNG (8 or
  16 bits), GIF, BMP or WebP (what TF Serving's REST API receives as
  `{"b64": ...}`), decoded as `keras-aim classify` decodes files
  (`keras_aim.data.images.decode_image`).
- `predict_preprocessed`: `images` float32 `(B, h, w, 3)`, already
  resized, cropped and normalized (h, w: the model's crop).

Outputs: `logits`, `probabilities`, `top_k_indices`, `top_k_scores` for
an `AIMImageClassifier` (or `AIMv2ImageClassifier`); `embedding` (mean of
the final tokens) and `tokens` for an `AIMBackbone` or `AIMv2Backbone`.

An `AIMv2LiT` gets other signatures (see `LIT_SIGNATURES`): image
embeddings from uint8 images (`serving_default`, `image_embedding`) or
preprocessed ones (`image_embedding_preprocessed`), text embeddings from
token ids (`text_embedding`, `(B, T <= 77)` int32 from
`AIMv2Tokenizer.pack`, padded to 77 with the end token inside: padding
after the end token changes nothing; `text_embedding_full_length` takes
exactly 77), and `zero_shot_logits` (`logits`, `probabilities` `(B, C)`)
from uint8 images and class text embeddings `(C, 768)`. Each embedding
signature returns the projected `embedding` and its L2-normalized
`normalized_embedding` (`image_embedding_preprocessed` also the clamped
`logit_scale`).

Each signature checks its input where it enters (`serving_inputs`): an
empty batch, or an image with no rows or columns, fails the request with an
`InvalidArgumentError` saying so ("the batch is empty", "images must have
height and width > 0") before any other op runs.

TensorFlow is imported inside the functions: this is the backend-specific
part of keras_aim. TensorFlow backend: `keras.export.ExportArchive`
directly. JAX: `ExportArchive` converts the model with jax2tf (native
serialization for CPU and CUDA); decoding and resizing stay TF ops outside
the converted function. PyTorch: the model is saved to a `.keras` file and a
TensorFlow-backend subprocess exports it.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import keras
from keras import ops
from keras_hub.models import Backbone, ImageClassifier

from keras_aim.export.serving_inputs import checked_batch, checked_images
from keras_aim.export.versions import refuse_existing, resolve_version
from keras_aim.models.aim.aim_backbone import AIMBackbone
from keras_aim.models.aim.aim_image_classifier import AIMImageClassifier
from keras_aim.models.aim.aim_image_converter import AIMImageConverter
from keras_aim.models.aimv2.aimv2_backbone import AIMv2Backbone
from keras_aim.models.aimv2.aimv2_lit import AIMv2LiT
from keras_aim.models.families import evaluation_converter
from keras_aim.utils.atomic_files import atomic_directory
from keras_aim.utils.image_shapes import check_patch_multiple

SIGNATURES = ("serving_default", "predict_images", "predict_preprocessed")
LIT_SIGNATURES = (
    "serving_default", "image_embedding", "image_embedding_preprocessed",
    "text_embedding", "text_embedding_full_length", "zero_shot_logits",
)
EMBEDDING_OUTPUTS = ("embedding", "normalized_embedding")
CLASSIFIER_OUTPUTS = ("logits", "probabilities", "top_k_indices", "top_k_scores")
BACKBONE_OUTPUTS = ("embedding", "tokens")
# jax2tf: one serialized module that runs on both kinds of TF Serving hosts.
JAX_SERVING_PLATFORMS = ("cpu", "cuda")
DEFAULT_BACKBONE_IMAGE_SIZE = 224


def signature_names(model) -> tuple[str, ...]:
    """The signatures `export_saved_model` writes for `model`."""
    return LIT_SIGNATURES if isinstance(model, AIMv2LiT) else SIGNATURES


def export_saved_model(
    model: AIMImageClassifier | AIMBackbone | AIMv2Backbone | AIMv2LiT,
    export_dir: str | os.PathLike,
    version: int | None = None,
    overwrite: bool = False,
    top_k: int = 5,
    image_size: int | None = None,
) -> str:
    """Writes `model` as a TF Serving model version; returns its path.

    Args:
        model: an `AIMImageClassifier`, `AIMBackbone`, `AIMv2Backbone` or
            `AIMv2LiT` on any backend.
        export_dir: TF Serving's model base path; the SavedModel goes into
            `export_dir/<version>/`. A new or empty folder, or one holding
            only earlier exports (numbered folders with a `saved_model.pb`);
            any other content is refused before any work
            (`keras_aim.export.versions.check_export_folder`).
        version: positive int; default: one more than the highest existing
            version (1 for a new directory).
        overwrite: replace an existing version (else `FileExistsError`).
        top_k: classifier outputs the `top_k` best classes (capped at the
            number of classes).
        image_size: side of the center crop, for backbones built with a
            dynamic `image_shape` (and classifiers without preprocessor);
            otherwise the model's own size. Default 224.

    The version is written into a hidden staging folder next to it (which
    TF Serving ignores) and renamed into place when complete: a failed
    export leaves existing versions untouched and no partial version behind.
    """
    check_exportable(model, top_k, image_text=True)
    version = resolve_version(export_dir, version, overwrite)
    target = Path(export_dir) / str(version)
    with atomic_directory(str(target), replace=True) as staging:
        write_saved_model(model, staging, top_k=top_k, image_size=image_size)
        refuse_existing(target, overwrite)  # someone may have written it meanwhile
    return str(target)


def is_classifier(model) -> bool:
    """An image classifier (AIM's, or any keras-hub `ImageClassifier`)."""
    return isinstance(model, ImageClassifier)


def is_image_backbone(model) -> bool:
    """An image trunk: a keras-hub `Backbone` with an `image_shape`."""
    return isinstance(model, Backbone) and hasattr(model, "image_shape")


def check_exportable(model, top_k: int, image_text: bool = False) -> None:
    """Raises unless `model` is an image classifier or image backbone (or,
    with `image_text`, an `AIMv2LiT`) and `top_k` a positive int."""
    if not (
        is_classifier(model)
        or is_image_backbone(model)
        or (image_text and isinstance(model, AIMv2LiT))
    ):
        lit = " or an AIMv2LiT" if image_text else ""
        raise TypeError(
            "keras_aim exports an image classifier or image backbone (e.g. "
            f"AIMImageClassifier, AIMBackbone, AIMv2Backbone){lit}; received "
            f"{type(model).__name__}. For other Keras models use model.export()."
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int; received {top_k!r}.")


def serving_converter(model, image_size: int | None = None) -> AIMImageConverter:
    """The evaluation preprocessing the exported graph runs: the
    classifier's own converter if it has one, else the family's converter
    (`AIMImageConverter`, AIMv2's "clip" pipeline) cropping to the trunk's
    image size (or `image_size`)."""
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None and image_size is None:
        return preprocessor.image_converter
    backbone = model.backbone if is_classifier(model) else model
    if isinstance(model, AIMv2LiT):
        backbone = model.vision_encoder
    height, width = backbone.image_shape[:2]
    if image_size is not None:
        if height is not None and (height, width) != (image_size, image_size):
            raise ValueError(
                f"image_size={image_size} does not match the model's fixed "
                f"image_shape {backbone.image_shape}; leave image_size unset."
            )
        height = width = image_size
    elif height is None or width is None:
        height = width = DEFAULT_BACKBONE_IMAGE_SIZE
    check_patch_multiple((height, width), backbone.patch_size, "The export's image size")
    return evaluation_converter(backbone, (height, width))


def serving_outputs(model, images, top_k: int = 5) -> dict:
    """The exported outputs for preprocessed `images` `(B, h, w, 3)` (Keras
    ops: runs on any backend). Classifier: logits, probabilities `(B, C)`,
    top_k_indices (int32), top_k_scores `(B, k)`; backbone: embedding
    `(B, D)`, tokens `(B, N, D)`; all float32."""
    if is_classifier(model):
        logits = ops.cast(model(images, training=False), "float32")
        probabilities = ops.softmax(logits, axis=-1)
        # argsort, not ops.top_k: JAX lowers top_k to a StableHLO composite
        # that TensorFlow's deserializer (TF 2.21) cannot read.
        k = min(top_k, model.num_classes)
        indices = ops.argsort(-probabilities, axis=-1)[:, :k]
        scores = ops.take_along_axis(probabilities, indices, axis=-1)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "top_k_indices": ops.cast(indices, "int32"),
            "top_k_scores": scores,
        }
    tokens = ops.cast(model(images, training=False), "float32")
    return {"embedding": ops.mean(tokens, axis=1), "tokens": tokens}


def embedding_outputs(embedding) -> dict:
    """`embedding` `(B, P)` and its L2-normalized copy, float32."""
    embedding = ops.cast(embedding, "float32")
    return {"embedding": embedding, "normalized_embedding": ops.normalize(embedding, axis=-1)}


def write_saved_model(
    model, path: str, top_k: int = 5, image_size: int | None = None
) -> None:
    """Writes the SavedModel (all signatures) into `path`, from the active
    backend; PyTorch hands the model to a TensorFlow-backend subprocess."""
    backend = keras.config.backend()
    if backend == "torch":
        _write_in_tensorflow_process(model, path, top_k, image_size)
        return
    if backend not in ("tensorflow", "jax"):
        raise NotImplementedError(
            f"SavedModel export runs on the TensorFlow, JAX and PyTorch "
            f"backends; the active backend is {backend!r}."
        )
    import tensorflow as tf

    from keras_aim.data.images import decode_image

    converter = serving_converter(model, image_size)
    height, width = converter.image_size
    # Two archives: `models` turns the model functions into TensorFlow
    # functions (jax2tf on JAX); `archive` holds the signatures, TensorFlow
    # functions that check their inputs (`serving_inputs`) before calling
    # them. Only `archive` is written, with each variable its functions use.
    models = keras.export.ExportArchive()
    archive = keras.export.ExportArchive()
    backend_kwargs = {}
    if backend == "jax":
        # jax2tf binds the variables `models` tracks (as tf.Variables). On
        # TensorFlow the functions use the model's own variables; tracking
        # the model in a written archive there would store every weight
        # twice: a 2x larger SavedModel.
        models.track(model)
        backend_kwargs["jax2tf_kwargs"] = {
            "native_serialization_platforms": JAX_SERVING_PLATFORMS
        }
    if isinstance(model, AIMv2LiT):
        _add_lit_endpoints(archive, models, model, converter, backend_kwargs)
        archive.write_out(path, verbose=False)
        return

    def model_outputs(images):
        return serving_outputs(model, images, top_k)

    preprocessed_spec = tf.TensorSpec((None, height, width, 3), tf.float32, name="images")
    predict = models.add_endpoint(
        "predict_preprocessed", model_outputs, input_signature=[preprocessed_spec],
        **backend_kwargs,
    )

    @tf.function(input_signature=[preprocessed_spec])
    def predict_preprocessed(images):
        return predict(checked_batch(images))

    # Decoding and resizing: TensorFlow ops outside the (jax2tf-)converted
    # model function, with the converter's own dynamic-shape TF path.
    @tf.function(
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8, name="images")]
    )
    def serve_images(images):
        return predict(converter(checked_images(images)))

    @tf.function(
        input_signature=[tf.TensorSpec((None,), tf.string, name="image_bytes")]
    )
    def serve_image_bytes(image_bytes):
        def decode_and_preprocess(data):
            # The decoding `keras-aim classify` and image folders use (its
            # decoders refuse files of zero width or height themselves).
            return converter(decode_image(data))

        images = tf.map_fn(
            decode_and_preprocess,
            checked_batch(image_bytes, "encoded image"),
            fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32),
        )
        return predict(images)

    for name, function in (
        ("serving_default", serve_images),
        ("predict_images", serve_image_bytes),
        ("predict_preprocessed", predict_preprocessed),
    ):
        function.get_concrete_function()  # traced once: ExportArchive needs it
        archive.add_endpoint(name, function)
    archive.write_out(path, verbose=False)


def _add_lit_endpoints(
    archive, models, model: AIMv2LiT, converter, backend_kwargs
) -> None:
    """The LiT model's signatures (`LIT_SIGNATURES`) into `archive`. The
    model runs in two (jax2tf-)converted functions of `models`, images at
    the crop size and token ids at the full context length; input checks,
    decoding, resizing, padding and the zero-shot logits are TensorFlow ops
    around them."""
    import tensorflow as tf

    height, width = converter.image_size
    length = model.text_encoder.sequence_length
    end_token = model.text_encoder.end_token_id

    def image_outputs(images):
        return {
            **embedding_outputs(model.encode_image(images)),
            "logit_scale": model.logit_scale.scale(),
        }

    def text_outputs(token_ids):
        return embedding_outputs(model.encode_text(token_ids))

    preprocessed_spec = tf.TensorSpec((None, height, width, 3), tf.float32, name="images")
    full_length_spec = tf.TensorSpec((None, length), tf.int32, name="token_ids")
    images_model = models.add_endpoint(
        "image_embedding_preprocessed", image_outputs,
        input_signature=[preprocessed_spec], **backend_kwargs,
    )
    text_model = models.add_endpoint(
        "text_embedding_full_length", text_outputs,
        input_signature=[full_length_spec], **backend_kwargs,
    )

    def embeddings(outputs):
        return {k: outputs[k] for k in EMBEDDING_OUTPUTS}

    @tf.function(input_signature=[preprocessed_spec])
    def image_embedding_preprocessed(images):
        return images_model(checked_batch(images))

    @tf.function(input_signature=[full_length_spec])
    def text_embedding_full_length(token_ids):
        return text_model(checked_batch(token_ids, "token sequence"))

    @tf.function(
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8, name="images")]
    )
    def image_embedding(images):
        return embeddings(images_model(converter(checked_images(images))))

    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.int32, name="token_ids")])
    def text_embedding(token_ids):
        token_ids = checked_batch(token_ids, "token sequence")
        given = tf.shape(token_ids)[1]
        tf.debugging.assert_less_equal(
            given, length,
            message=f"token_ids are longer than the model's {length}; pack the "
            "texts with truncation (AIMv2Tokenizer.pack(texts, truncate=True)).",
        )
        vocabulary = model.text_encoder.vocabulary_size
        in_vocabulary = tf.reduce_all((token_ids >= 0) & (token_ids < vocabulary))
        tf.debugging.Assert(
            in_vocabulary,
            [f"token_ids must be in 0..{vocabulary - 1} (the model's vocabulary); "
             "tokenize with the model's AIMv2Tokenizer."],
        )
        padded = tf.pad(token_ids, [[0, 0], [0, length - given]], constant_values=end_token)
        return embeddings(text_model(padded))

    @tf.function(
        input_signature=[
            tf.TensorSpec((None, None, None, 3), tf.uint8, name="images"),
            tf.TensorSpec((None, model.projection_dim), tf.float32, name="text_embeddings"),
        ]
    )
    def zero_shot(images, text_embeddings):
        outputs = images_model(converter(checked_images(images)))
        image = tf.math.l2_normalize(outputs["embedding"], axis=-1)
        text = tf.math.l2_normalize(text_embeddings, axis=-1)
        logits = outputs["logit_scale"] * tf.matmul(image, text, transpose_b=True)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    for name, function in (
        ("serving_default", image_embedding),
        ("image_embedding", image_embedding),
        ("image_embedding_preprocessed", image_embedding_preprocessed),
        ("text_embedding", text_embedding),
        ("text_embedding_full_length", text_embedding_full_length),
        ("zero_shot_logits", zero_shot),
    ):
        function.get_concrete_function()
        archive.add_endpoint(name, function)


def _write_in_tensorflow_process(model, path, top_k, image_size) -> None:
    """PyTorch backend: save the model, export it from a TensorFlow-backend
    Python process (Keras cannot trace PyTorch models into TF graphs)."""
    with tempfile.TemporaryDirectory(prefix="keras_aim_export_") as scratch:
        model_file = os.path.join(scratch, "model.keras")
        model.save(model_file)
        command = [
            sys.executable, "-m", "keras_aim.export.saved_model",
            "--model", model_file, "--saved-model", path, "--top-k", str(top_k),
        ]
        if image_size is not None:
            command += ["--image-size", str(image_size)]
        # The child imports this very keras_aim, installed or not.
        package_root = str(Path(__file__).resolve().parents[2])
        python_path = os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p
        )
        result = subprocess.run(
            command,
            env={**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": python_path},
            capture_output=True,
            text=True,
        )
    if result.returncode != 0:
        how = f"exited with status {result.returncode}"
        if result.returncode < 0:
            how = (
                f"was killed by signal {-result.returncode} (out of memory? "
                "it holds about 2-3x the weights besides this process)"
            )
        raise RuntimeError(
            f"The TensorFlow-backend export process {how}; PyTorch models are "
            "exported through TensorFlow. Its output:\n" + result.stderr[-4000:]
        )


# --- Clients ------------------------------------------------------------


def rest_request_body(
    images: Iterable[bytes], signature_name: str = "predict_images"
) -> dict:
    """A TF Serving REST `:predict` body for encoded image files:
    `{"signature_name": ..., "instances": [{"b64": ...}, ...]}`."""
    return {
        "signature_name": signature_name,
        "instances": [{"b64": base64.b64encode(data).decode("ascii")} for data in images],
    }


def predict_rest_body(saved_model, body: dict) -> dict:
    """Runs a REST `:predict` body (`rest_request_body`) on a SavedModel as
    TF Serving would: base64-decodes the instances, calls the named
    signature (`predict_images` by default) and returns
    `{"predictions": [{output: list, ...}, ...]}`, one dict per image.

    `saved_model`: an export directory (a version folder) or the object
    `tf.saved_model.load` returned. Undecodable images raise
    `tf.errors.InvalidArgumentError`.
    """
    import tensorflow as tf

    if isinstance(saved_model, (str, os.PathLike)):
        saved_model = tf.saved_model.load(str(saved_model))
    instances = body.get("instances")
    if not isinstance(instances, list) or not all(
        isinstance(item, dict) and set(item) == {"b64"} for item in instances
    ):
        raise ValueError(
            'The body needs "instances": [{"b64": "<base64 image file>"}, ...] '
            "(see rest_request_body)."
        )
    signature = saved_model.signatures[body.get("signature_name", "predict_images")]
    data = [base64.b64decode(item["b64"]) for item in instances]
    outputs = signature(image_bytes=tf.constant(data, tf.string))
    outputs = {key: value.numpy().tolist() for key, value in outputs.items()}
    return {
        "predictions": [
            {key: value[i] for key, value in outputs.items()} for i in range(len(data))
        ]
    }


def keras2_layer(
    export_dir: str | os.PathLike,
    signature: str = "serving_default",
    output: str | None = None,
):
    """The exported model as a tf-keras (Keras 2) layer, for TensorFlow
    pipelines still on `tf_keras` (which has no `TFSMLayer`).

    Args:
        export_dir: a version folder written by `export_saved_model`.
        signature: `serving_default` (uint8 images `(B, H, W, 3)`),
            `predict_images` (encoded strings `(B,)`) or
            `predict_preprocessed`.
        output: one output name (e.g. `"embedding"`) to return a tensor;
            default: the dict of all outputs.

    The layer is frozen (inference only). In Keras 3 on the TensorFlow
    backend use `keras.layers.TFSMLayer(export_dir, call_endpoint=...)`.
    """
    import tensorflow as tf
    import tf_keras

    class AIMSavedModelLayer(tf_keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(trainable=False, **kwargs)
            self.saved_model = tf.saved_model.load(str(export_dir))
            if signature not in self.saved_model.signatures:
                raise ValueError(
                    f"{export_dir} has no signature {signature!r}; it has "
                    f"{sorted(self.saved_model.signatures)}."
                )
            self.function = self.saved_model.signatures[signature]
            (self.input_name,) = self.function.structured_input_signature[1]
            names = sorted(self.function.structured_outputs)
            if output is not None and output not in names:
                raise ValueError(
                    f"Signature {signature!r} has no output {output!r}; its "
                    f"outputs are {names}."
                )

        def call(self, inputs):
            outputs = self.function(**{self.input_name: inputs})
            return outputs if output is None else outputs[output]

    return AIMSavedModelLayer(name="aim_saved_model")


def _main(argv: Sequence[str] | None = None) -> int:
    """`python -m keras_aim.export.saved_model`: the TensorFlow-backend half of the
    PyTorch export (writes a SavedModel of a `.keras` file into a folder)."""
    import argparse

    import keras_aim

    keras_aim.register_classes()  # for loading the .keras file

    parser = argparse.ArgumentParser(prog="python -m keras_aim.export.saved_model")
    parser.add_argument("--model", required=True)
    parser.add_argument("--saved-model", required=True)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=None)
    args = parser.parse_args(argv)
    from keras_aim.loading.keras_files import load_model_file

    model = load_model_file(args.model)
    write_saved_model(model, args.saved_model, args.top_k, args.image_size)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
