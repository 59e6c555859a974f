"""The benchmarks compare like with like: the plain PyTorch AIM of
benchmarks/torch_reference_aim.py computes what keras_aim computes."""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_aim
from keras_aim.layers import prefix_causal_mask
from keras_aim.losses import next_patch_pixel_loss
from tests.conftest import needs_torch_backend, to_numpy

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# Small, but with every part: 2 blocks, 2 heads, a 2-block pixel head.
CONFIG = dict(image_shape=(32, 32, 3), patch_size=8, hidden_dim=32, num_layers=2, num_heads=2)
HEAD = dict(pixel_head_width=48, pixel_head_depth=2)


@pytest.fixture
def torch_reference(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import torch_reference_aim

    return torch_reference_aim


def _pretrainer():
    keras.utils.set_random_seed(3)
    return keras_aim.AIMPretrainer(keras_aim.AIMBackbone(**CONFIG), seed=1, **HEAD)


def _torch_twin(torch_reference, pretrainer):
    backbone = pretrainer.backbone
    model = torch_reference.TorchAIM(
        image_size=32, patch_size=8, hidden_dim=32, num_layers=2, num_heads=2,
        head_width=HEAD["pixel_head_width"], head_depth=HEAD["pixel_head_depth"],
    )
    torch_reference.copy_keras_weights(model, backbone, pretrainer.pixel_head)
    return model


@needs_torch_backend
def test_torch_reference_matches_keras_outputs_and_loss(torch_reference):
    import torch

    pretrainer = _pretrainer()
    model = _torch_twin(torch_reference, pretrainer)
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype("float32")
    prefix = np.array([1, 7, 15], dtype="int32")
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    with torch.no_grad():
        tokens = model(nchw).numpy()
        predictions = model.pretraining_outputs(nchw, torch.from_numpy(prefix).long())
        loss = torch_reference.pixel_loss(nchw, predictions, torch.from_numpy(prefix).long(), 8)
    np.testing.assert_allclose(tokens, to_numpy(pretrainer.backbone(images)), atol=1e-4)

    mask = prefix_causal_mask(prefix, 16)
    keras_tokens = pretrainer.backbone.encode(images, attention_mask=mask)
    keras_predictions = pretrainer.pixel_head(keras_tokens, grid=(4, 4))
    np.testing.assert_allclose(predictions.numpy(), to_numpy(keras_predictions), atol=1e-4)
    keras_loss = next_patch_pixel_loss(images, keras_predictions, prefix, 8)
    np.testing.assert_allclose(float(loss), float(to_numpy(keras_loss)), rtol=1e-5)


@needs_torch_backend
def test_torch_reference_train_step_matches_keras(torch_reference):
    """One optimizer step from the same weights and prefix lengths gives the
    same loss, and the same loss afterwards (same update)."""
    import torch

    pretrainer = _pretrainer()
    model = _torch_twin(torch_reference, pretrainer)
    images = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype("float32")
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    pretrainer.compile()
    seed_state = to_numpy(pretrainer.prefix_sampler.seed_generator.state)
    prefix = to_numpy(pretrainer.prefix_sampler(images, training=True))
    pretrainer.prefix_sampler.seed_generator.state.assign(seed_state)  # same draw
    keras_loss = pretrainer.train_on_batch(images, return_dict=True)["loss"]

    optimizer = torch_reference.make_optimizer(model)
    loss = torch_reference.train_step(
        model, optimizer, nchw, prefix_lengths=torch.from_numpy(prefix).long()
    )
    np.testing.assert_allclose(float(loss), keras_loss, rtol=1e-5)

    # The same update (learning rate 1e-3: each weight moved by ~1e-3).
    pairs = [
        (model.blocks[0].attn.qkv.weight.T, pretrainer.backbone.blocks[0].attn.qkv.kernel),
        (model.blocks[1].mlp.fc2.weight.T, pretrainer.backbone.blocks[1].mlp.fc2.kernel),
        (model.head_out.bias, pretrainer.pixel_head.output_proj.bias),
    ]
    # Keras adds Adam's epsilon to sqrt(v) before the bias correction,
    # PyTorch after it: steps of weights whose gradients are ~epsilon
    # differ (a few in a thousand), but never by more than one step.
    for torch_weight, keras_weight in pairs:
        difference = np.abs(torch_weight.detach().numpy() - to_numpy(keras_weight))
        assert np.mean(difference < 2e-5) > 0.98
        assert difference.max() < 1e-3
