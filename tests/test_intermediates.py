"""`forward_intermediates`: timm's feature API on backbones and classifiers."""

import keras
import numpy as np
import pytest

from tests.conftest import PARITY_ATOL, to_numpy
from tests.model_families import each_family


def numpy_all(outputs):
    return [to_numpy(x) for x in outputs]


@each_family
def test_tokens_grid_and_channels_first_formats(family):
    backbone = family.backbone()
    patch = family.backbone_config["patch_size"]
    # Not square and not the built size: rows and columns must not swap.
    images = np.random.RandomState(0).normal(size=(2, 2 * patch, 3 * patch, 3)).astype("float32")
    tokens = backbone.forward_intermediates(images, [0, -1])
    grid = backbone.forward_intermediates(images, [0, -1], output_fmt="NHWC")
    nchw = backbone.forward_intermediates(images, [0, -1], output_fmt="NCHW")
    for key in ("embedding", "final"):
        tokens[key + "s"] = [tokens[key]]
        grid[key + "s"] = [grid[key]]
        nchw[key + "s"] = [nchw[key]]
    for key in ("intermediates", "embeddings", "finals"):
        for flat, square, first in zip(tokens[key], grid[key], nchw[key]):
            flat, square, first = to_numpy(flat), to_numpy(square), to_numpy(first)
            assert square.shape == (2, 2, 3, family.hidden_dim)
            for row in range(2):
                for col in range(3):
                    np.testing.assert_array_equal(square[:, row, col], flat[:, row * 3 + col])
            np.testing.assert_array_equal(first, square.transpose(0, 3, 1, 2))


@each_family
def test_indices_norm_final_and_embedding(family):
    backbone = family.backbone()
    images = family.images(2)
    depth = backbone.num_layers
    every = numpy_all(backbone.block_outputs(images))
    out = backbone.forward_intermediates(images)
    assert len(out["intermediates"]) == depth
    for got, want in zip(numpy_all(out["intermediates"]), every):
        np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(to_numpy(out["final"]), to_numpy(backbone(images)), atol=1e-6)
    embedding = backbone.flatten_grid(
        backbone.position_embedding(backbone.patch_embedding(images))
    )
    np.testing.assert_allclose(to_numpy(out["embedding"]), to_numpy(embedding), atol=1e-6)
    # An int n: the last n blocks; negative indices count from the end.
    last_two = numpy_all(backbone.forward_intermediates(images, 2, intermediates_only=True))
    np.testing.assert_allclose(last_two[0], every[depth - 2], atol=1e-6)
    picked = numpy_all(backbone.forward_intermediates(images, [-1, 0], intermediates_only=True))
    np.testing.assert_allclose(picked[0], every[-1], atol=1e-6)
    np.testing.assert_allclose(picked[1], every[0], atol=1e-6)
    normed = backbone.forward_intermediates(images, [-1], norm=True)
    np.testing.assert_allclose(
        to_numpy(normed["intermediates"][0]), to_numpy(out["final"]), atol=1e-6
    )


@each_family
def test_stop_early_runs_no_later_block(family, monkeypatch):
    backbone = family.backbone()
    images = family.images(1)
    calls = []
    last = backbone.blocks[-1]
    original = last.call
    monkeypatch.setattr(last, "call", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = backbone.forward_intermediates(images, [0], stop_early=True)
    assert set(out) == {"intermediates", "embedding"} and calls == []
    backbone.forward_intermediates(images, [0], intermediates_only=True)
    assert calls == []
    assert "final" in backbone.forward_intermediates(images, [0])
    assert calls == [1]


@each_family
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"indices": [99]}, ValueError, "out of range"),
        ({"indices": 0}, ValueError, "last 0 blocks"),
        ({"indices": "last"}, TypeError, "indices must be"),
        ({"output_fmt": "NWHC"}, ValueError, "output_fmt must be one of NLC"),
    ],
)
def test_bad_arguments_name_the_problem(family, kwargs, error, match):
    with pytest.raises(error, match=match):
        family.backbone().forward_intermediates(family.images(1), **kwargs)


@each_family
def test_classifier_pre_logits_and_logits(family):
    classifier = family.classifier()
    images = family.images(2)
    out = classifier.forward_intermediates(images, [0], output_fmt="NHWC")
    assert set(out) == {"intermediates", "embedding", "pre_logits", "logits"}
    np.testing.assert_allclose(to_numpy(out["logits"]), to_numpy(classifier(images)), atol=1e-5)
    assert tuple(out["pre_logits"].shape) == (2, family.hidden_dim)
    np.testing.assert_allclose(
        to_numpy(classifier.logits_from_pre_logits(out["pre_logits"])),
        to_numpy(out["logits"]), atol=1e-6,
    )
    backbone_out = classifier.backbone.forward_intermediates(images, [0], output_fmt="NHWC")
    np.testing.assert_allclose(
        to_numpy(out["intermediates"][0]), to_numpy(backbone_out["intermediates"][0]), atol=1e-6
    )
    only = classifier.forward_intermediates(images, [0], intermediates_only=True)
    assert isinstance(only, list) and len(only) == 1


def test_reference_block_outputs_and_logits(tiny_classifier, reference):
    out = tiny_classifier.forward_intermediates(reference["images_nhwc"])
    for got, want in zip(numpy_all(out["intermediates"]), reference["block_outputs"]):
        np.testing.assert_allclose(got, want, atol=PARITY_ATOL)
    np.testing.assert_allclose(to_numpy(out["logits"]), reference["logits"], atol=PARITY_ATOL)
    assert keras.ops.shape(out["pre_logits"]) == (3, 64)
