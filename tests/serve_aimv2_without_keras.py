"""Runs exported AIMv2 SavedModels with TensorFlow alone (as TF Serving
does; tests/test_aimv2_export.py). Like serve_without_keras.py, this process
imports no keras, keras_hub, keras_aim or tf_keras module itself.

    python tests/serve_aimv2_without_keras.py INPUTS.npz OUTPUTS.npz LIT_DIR BACKBONE_DIR

INPUTS.npz: `preprocessed` float images, `token_ids` int32, `raw` uint8
images. OUTPUTS.npz: every signature's outputs, named `signature/output`.
"""

import sys

import numpy as np
import tensorflow as tf

from serve_without_keras import KERAS_PACKAGES, LOADED_BY_TENSORFLOW, keras_modules


def main(inputs_file: str, outputs_file: str, lit_dir: str, backbone_dir: str) -> None:
    inputs = dict(np.load(inputs_file))
    lit = tf.saved_model.load(lit_dir)
    results = {}

    def record(name, outputs):
        for key, value in outputs.items():
            results[f"{name}/{key}"] = value.numpy()

    record("image_embedding_preprocessed", lit.signatures["image_embedding_preprocessed"](
        images=tf.constant(inputs["preprocessed"])))
    record("image_embedding", lit.signatures["image_embedding"](images=tf.constant(inputs["raw"])))
    record("serving_default", lit.signatures["serving_default"](images=tf.constant(inputs["raw"])))
    text = lit.signatures["text_embedding"](token_ids=tf.constant(inputs["token_ids"]))
    record("text_embedding", text)
    record("zero_shot_logits", lit.signatures["zero_shot_logits"](
        images=tf.constant(inputs["raw"]), text_embeddings=text["embedding"]))
    try:  # ids outside the vocabulary are refused by the graph
        lit.signatures["text_embedding"](token_ids=tf.constant([[0, 10_000]], tf.int32))
        results["bad_ids_error"] = np.array("none")
    except tf.errors.OpError as error:
        results["bad_ids_error"] = np.array(type(error).__name__)
    backbone = tf.saved_model.load(backbone_dir)
    record("backbone", backbone.signatures["serving_default"](images=tf.constant(inputs["raw"])))
    imported = keras_modules() - LOADED_BY_TENSORFLOW
    imported |= {name for name in KERAS_PACKAGES[1:] if name in sys.modules}
    results["imported"] = np.array(",".join(sorted(imported)))
    np.savez(outputs_file, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
