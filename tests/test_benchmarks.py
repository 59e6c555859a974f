"""The benchmarks compare like with like: the plain PyTorch AIM of
benchmarks/torch_reference_aim.py computes what keras_aim computes."""

from __future__ import annotations

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


def _throughput_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import throughput

    return throughput


TINY_ARGS = [
    "--image-size", "32", "--patch-size", "8", "--hidden-dim", "32", "--num-layers", "1",
    "--num-heads", "2", "--head-width", "32", "--head-depth", "1", "--batch-size", "2",
    "--runs", "1", "--calls", "1", "--warmup", "1",
]


def test_flop_count_matches_a_hand_count(monkeypatch):
    throughput = _throughput_module(monkeypatch)
    config = dict(image_size=28, patch_size=14, hidden_dim=8, num_layers=2, num_heads=2,
                  head_width=4, head_depth=1, batch_size=1)
    n, d, pixels = 4, 8, 14 * 14 * 3
    per_layer = 2 * n * d * (3 * d) + 2 * n * d * d + 2 * (2 * n * d * 4 * d)
    flops = throughput.forward_flops(config)
    assert flops["trunk"] == 2 * n * pixels * d + 2 * per_layer
    assert flops["attention"] == 2 * (2 * n * n * d) * 2
    head = 2 * n * d * 4 + 2 * (2 * n * 4 * 16) + 2 * n * 4 * pixels
    assert flops["pixel_head"] == head
    steps = throughput.step_flops(config)
    assert steps["train"] == 3 * (flops["trunk"] + flops["attention"] + head)


@pytest.mark.slow  # compiles a training step
def test_keras_worker_measures_this_backend(monkeypatch, capsys):
    """The benchmark's Keras worker runs inference and a pre-training step
    on the current backend and reports times and peak memory."""
    import json

    throughput = _throughput_module(monkeypatch)
    monkeypatch.setenv("KERAS_BACKEND", keras.config.backend())
    target = "keras-" + keras.config.backend()
    throughput.main(["--worker", target, *TINY_ARGS])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert len(result["inference"]) == 1 and result["inference"][0] > 0
    assert len(result["train"]) == 1 and result["train"][0] > 0
    assert result["train_peak"] >= result["inference_peak"] > 0

    rows = throughput.table_rows({target: result}, throughput.resolve_config(
        throughput.parse_args(TINY_ARGS)), rate=1e9, peak=None)
    assert [(r["target"], r["mode"]) for r in rows] == [(target, "inference"), (target, "train")]
    table = throughput.format_table(rows, markdown=True)
    assert table.count("\n") == 3 and target in table


@needs_torch_backend
def test_torch_worker_runs_eager(monkeypatch, capsys):
    import json

    throughput = _throughput_module(monkeypatch)
    throughput.main(["--worker", "torch-eager", *TINY_ARGS])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["inference"][0] > 0 and result["train"][0] > 0


def test_flash_attention_setting_reaches_the_attention_op():
    """`flash_attention=True` is passed to keras.ops.dot_product_attention,
    which refuses it on a CPU; False runs and changes nothing."""
    layer = keras_aim.layers.AIMAttention(32, 2)
    x = np.random.default_rng(0).normal(size=(2, 16, 32)).astype("float32")
    expected = to_numpy(layer(x))
    layer.flash_attention = False
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-6)
    layer.flash_attention = True
    with pytest.raises((RuntimeError, ValueError, ImportError)):
        layer(x)
