"""SavedModel export of AIMv2 backbones and of the LiT model, served by
plain TensorFlow: the same embeddings and logits as Keras and Apple."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras_aim
from keras_aim.export import saved_model as aim_export
from tests import aimv2_tiny
from tests.conftest import PARITY_ATOL, to_numpy
from tests.test_export import saved_model_proto


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny LiT model and fixed-size backbone (reference weights), each
    exported once; on PyTorch through the TensorFlow subprocess."""
    root = tmp_path_factory.mktemp("aimv2_exports")
    lit, backbone = aimv2_tiny.lit_model(), aimv2_tiny.fixed_backbone()
    return {
        "lit": lit,
        "backbone": backbone,
        "lit_dir": aim_export.export_saved_model(lit, root / "lit"),
        "backbone_dir": aim_export.export_saved_model(backbone, root / "backbone"),
    }


def test_lit_signatures_and_their_shapes(exports):
    signatures = saved_model_proto(exports["lit_dir"]).meta_graphs[0].signature_def
    assert set(signatures) >= set(aim_export.LIT_SIGNATURES)

    def dims(name, io, key):
        tensors = getattr(signatures[name], io)
        return [d.size for d in tensors[key].tensor_shape.dim]

    assert dims("image_embedding", "inputs", "images") == [-1, -1, -1, 3]
    assert dims("image_embedding_preprocessed", "inputs", "images") == [-1, 28, 28, 3]
    assert dims("text_embedding", "inputs", "token_ids") == [-1, -1]
    assert dims("text_embedding_full_length", "inputs", "token_ids") == [-1, 12]
    assert dims("zero_shot_logits", "inputs", "text_embeddings") == [-1, 32]
    for name in ("image_embedding", "text_embedding"):
        assert sorted(signatures[name].outputs) == sorted(aim_export.EMBEDDING_OUTPUTS)
        assert dims(name, "outputs", "embedding") == [-1, 32]
    assert sorted(signatures["zero_shot_logits"].outputs) == ["logits", "probabilities"]


def test_lit_signatures_refuse_empty_batches_and_images_without_pixels(exports):
    import tensorflow as tf

    from keras_aim.export.serving_inputs import EMPTY_BATCH, EMPTY_IMAGE

    signatures = tf.saved_model.load(exports["lit_dir"]).signatures
    texts = tf.zeros((2, 32), tf.float32)
    calls = {
        EMPTY_BATCH: [
            ("image_embedding", {"images": tf.zeros((0, 40, 50, 3), tf.uint8)}),
            ("image_embedding_preprocessed", {"images": tf.zeros((0, 28, 28, 3))}),
            ("zero_shot_logits", {"images": tf.zeros((0, 40, 50, 3), tf.uint8),
                                  "text_embeddings": texts}),
            ("text_embedding", {"token_ids": tf.zeros((0, 10), tf.int32)}),
            ("text_embedding_full_length", {"token_ids": tf.zeros((0, 12), tf.int32)}),
        ],
        EMPTY_IMAGE: [
            ("serving_default", {"images": tf.zeros((1, 0, 50, 3), tf.uint8)}),
            ("zero_shot_logits", {"images": tf.zeros((1, 40, 0, 3), tf.uint8),
                                  "text_embeddings": texts}),
        ],
    }
    for problem, requests in calls.items():
        for name, inputs in requests:
            with pytest.raises(tf.errors.InvalidArgumentError, match=problem):
                signatures[name](**inputs)
    assert signatures["zero_shot_logits"](
        images=tf.zeros((1, 1, 1, 3), tf.uint8), text_embeddings=texts
    )["logits"].shape == (1, 2)


@pytest.mark.slow
def test_plain_tensorflow_serves_the_reference_embeddings(exports, tmp_path):
    ref = aimv2_tiny.outputs("lit")
    raw = np.random.RandomState(0).randint(0, 256, (3, 40, 50, 3)).astype("uint8")
    ids = ref["input_ids"].astype("int32")[:, :10]  # shorter than 12: padded inside
    np.savez(tmp_path / "in.npz", preprocessed=ref["images_nhwc"], token_ids=ids, raw=raw)
    script = str(Path(__file__).parent / "serve_aimv2_without_keras.py")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    result = subprocess.run(
        [sys.executable, script, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
         exports["lit_dir"], exports["backbone_dir"]],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = dict(np.load(tmp_path / "out.npz"))
    assert str(served["imported"]) == ""

    def close(key, want, atol=PARITY_ATOL):
        np.testing.assert_allclose(served[key], want, atol=atol, err_msg=key)

    close("image_embedding_preprocessed/embedding", ref["image_embeds"])
    close("image_embedding_preprocessed/normalized_embedding", ref["image_embeds_normalized"])
    close("text_embedding/embedding", ref["text_embeds"])
    close("text_embedding/normalized_embedding", ref["text_embeds_normalized"])
    logits = (served["image_embedding_preprocessed/logit_scale"]
              * served["image_embedding_preprocessed/normalized_embedding"]
              @ served["text_embedding/normalized_embedding"].T)
    np.testing.assert_allclose(logits, ref["logits_per_image"], atol=PARITY_ATOL)

    # uint8 images: the converter inside the graph, as Keras runs it.
    lit = exports["lit"]
    converter = keras_aim.AIMv2ImageConverter(image_size=(28, 28))
    expected = to_numpy(lit.encode_image(converter(raw)))
    close("image_embedding/embedding", expected)
    close("serving_default/embedding", expected)
    classes = keras_aim.zero_shot_classifier(lit, class_token_ids=[row[None] for row in ids])
    close("zero_shot_logits/logits", to_numpy(classes(converter(raw))))
    assert str(served["bad_ids_error"]) == "InvalidArgumentError"
    tokens = to_numpy(exports["backbone"](converter(raw)))
    close("backbone/tokens", tokens)
    close("backbone/embedding", tokens.mean(1))
