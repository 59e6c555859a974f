"""Shared fixtures: the tiny released-format AIM and its reference outputs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_aim  # noqa: E402
from tests import finished_tests  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "aim_v1_tiny"
# The reference model: 32x32 images, patch 8, D=64, 4 blocks, 4 heads,
# 10 classes, probe on the last 2 blocks (see fixtures/.../meta.json).
TINY_CONFIG = dict(
    image_shape=(32, 32, 3),
    patch_size=8,
    hidden_dim=64,
    num_layers=4,
    num_heads=4,
)
TINY_NUM_CLASSES = 10
TINY_PROBE_LAYERS = 2
PARITY_ATOL = 1e-4


# torch is imported by tests only in the PyTorch pass: loading torch into a
# TensorFlow or JAX process (two OpenMP runtimes) is a known source of rare
# native crashes, and keras_aim itself never needs it there.
needs_torch_backend = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="imports torch; runs in the PyTorch pass only",
)


# Tests that spawn processes for every backend (or are slow and
# backend-independent) run once, in the JAX pass.
once_in_jax_pass = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="spawns its own processes; runs once, in the JAX pass",
)


# The quick scaling study runs once, in the PyTorch pass: eager PyTorch
# compiles nothing, and the study builds a dozen small models (30 s there,
# two of its runs in worker processes, against 82-159 s of XLA compiling on
# a 2-core CPU).
once_in_torch_pass = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="backend-independent pipeline check; runs once, in the PyTorch pass",
)


def released_state_dict(*names: str) -> dict:
    """Released-format fixture files as one dict of NumPy arrays, read with
    keras_aim's own reader (no torch)."""
    from keras_aim.loading.state_dict import TorchZipReader

    state = {}
    for name in names:
        reader = TorchZipReader(fixture_path(name))
        state.update({k: np.array(reader.array(k)) for k in reader.keys()})
        reader.close()
    return state


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def fixture_path(name: str) -> str:
    return str(FIXTURES / name)


MULTI_DEVICE_COUNT = 8


def pytest_addoption(parser):
    finished_tests.add_option(parser)


def pytest_configure(config):
    finished_tests.register(config)


# The test files that take longest (minutes each on 2 cores), longest first.
# pytest-xdist (--dist loadfile) hands out whole files in collection order:
# starting the longest ones first keeps every worker busy to the end instead
# of leaving one long file running alone at the tail of a pass.
LONGEST_FILES_FIRST = (
    "test_multi_process.py", "test_recipes.py", "test_multi_device.py",
    "test_study.py", "test_cross_backend.py", "test_downstream.py",
    "test_quantization.py", "test_export_formats.py", "test_distribution.py",
)


def _longest_files_first(items) -> None:
    def rank(item):
        name = item.path.name
        if name in LONGEST_FILES_FIRST:
            return LONGEST_FILES_FIRST.index(name)
        return len(LONGEST_FILES_FIRST)

    items.sort(key=rank)  # stable: every other order stays as collected


def pytest_collection_modifyitems(config, items):
    """Puts the longest test files first (`LONGEST_FILES_FIRST`). The
    multi-device pass (`-m multi_device`) fails when it finds fewer than 8
    devices instead of skipping every test: a lost XLA flag must not turn
    the pass green. (Elsewhere those tests skip themselves.)"""
    _longest_files_first(items)
    expression = (config.option.markexpr or "").replace(" ", "")
    if expression != "multi_device" or not items:
        return
    found = 0
    if keras.config.backend() == "jax":
        found = len(keras.distribution.list_devices("cpu"))
    if found < MULTI_DEVICE_COUNT:
        raise pytest.UsageError(
            f"The multi-device pass needs {MULTI_DEVICE_COUNT} devices and found "
            f"{found} (backend {keras.config.backend()}): run it with "
            "KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{MULTI_DEVICE_COUNT} (tests/run_all_backends.sh does)."
        )


@pytest.fixture(autouse=True)
def no_network_and_private_cache(tmp_path_factory, monkeypatch):
    """Tests never reach the internet nor the user's cache: the release URL
    points at a closed local port and KERAS_AIM_HOME at a temp folder."""
    monkeypatch.setenv("KERAS_AIM_HOME", str(tmp_path_factory.mktemp("aim_home")))
    monkeypatch.setenv("KERAS_AIM_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("KERAS_AIM_HUB_URL", "http://127.0.0.1:9/")  # AIMv2 releases
    monkeypatch.delenv("KERAS_AIM_OFFLINE", raising=False)


@pytest.fixture
def release(tmp_path, monkeypatch):
    """The tiny model as a released preset on a local server (see
    tests/tiny_release.py)."""
    from tests.tiny_release import serve_tiny_release

    yield from serve_tiny_release(tmp_path, monkeypatch)


@pytest.fixture(scope="session")
def reference():
    """Every .npy array of the reference, by file stem."""
    return {p.stem: np.load(p) for p in FIXTURES.glob("*.npy")}


def make_tiny_backbone(**overrides) -> keras_aim.AIMBackbone:
    return keras_aim.AIMBackbone(**{**TINY_CONFIG, **overrides})


def make_tiny_classifier(preprocessor=None, **backbone_overrides):
    return keras_aim.AIMImageClassifier(
        make_tiny_backbone(**backbone_overrides),
        TINY_NUM_CLASSES,
        probe_layers=TINY_PROBE_LAYERS,
        preprocessor=preprocessor,
    )


@pytest.fixture
def tiny_backbone():
    """The tiny trunk with the reference weights loaded."""
    backbone = make_tiny_backbone()
    keras_aim.load_official_weights(
        backbone, backbone_file=fixture_path("backbone.pth")
    )
    return backbone


@pytest.fixture
def tiny_classifier():
    """The tiny classifier (trunk + probe) with the reference weights."""
    classifier = make_tiny_classifier()
    keras_aim.load_official_weights(
        classifier,
        backbone_file=fixture_path("backbone.pth"),
        head_file=fixture_path("head.pth"),
    )
    return classifier


def fixed_prefix_lengths(model, batch_size: int) -> np.ndarray:
    """Seeded prefix lengths `(B,)` in [1, N-1] for `fixed_prefix_loss_terms`."""
    num_patches = model.backbone.num_patches
    return np.random.RandomState(0).randint(1, num_patches, batch_size).astype("int32")


def fixed_prefix_loss_terms(model, images, prefix_lengths):
    """`(error sum, target count)` of an `AIMPretrainer`'s loss with the
    given prefix lengths instead of random draws (its trunk, pixel head and
    loss, called part by part), so that two ways of computing it see the
    same problem."""
    from keras_aim.layers import prefix_causal_mask
    from keras_aim.training.losses import next_patch_pixel_loss_terms

    mask = prefix_causal_mask(prefix_lengths, model.backbone.num_patches)
    tokens = model.backbone.encode(images, attention_mask=mask)
    predictions = model.pixel_head(tokens, grid=model.grid)
    return next_patch_pixel_loss_terms(
        images, predictions, prefix_lengths, model.backbone.patch_size
    )


def loss_and_gradients(model, images):
    """`(loss, [gradient per trainable variable])` of a compiled
    `AIMPretrainer` on `images` with `fixed_prefix_lengths`, from the
    backend's own autodiff (JAX `value_and_grad`, TensorFlow
    `GradientTape`, PyTorch `backward`), as NumPy."""
    lengths = keras.ops.convert_to_tensor(fixed_prefix_lengths(model, len(images)))
    images = keras.ops.convert_to_tensor(images)

    def loss():
        error, count = fixed_prefix_loss_terms(model, images, lengths)
        return error / count

    backend = keras.config.backend()
    if backend == "jax":
        import jax

        frozen = [(v, v.value) for v in model.non_trainable_variables]

        def loss_of(trainable):
            mapping = list(zip(model.trainable_variables, trainable)) + frozen
            with keras.StatelessScope(state_mapping=mapping):
                return loss()

        step = jax.jit(jax.value_and_grad(loss_of))  # compiled: op by op is slow
        value, gradients = step([v.value for v in model.trainable_variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                value = loss()
            return value, tape.gradient(value, model.trainable_variables)

        value, gradients = step()
    else:
        for variable in model.trainable_variables:
            variable.value.grad = None
        value = loss()
        value.backward()
        gradients = [variable.value.grad for variable in model.trainable_variables]
    return float(to_numpy(value)), [to_numpy(g) for g in gradients]


def training_record(model, images, steps=3, scope=None) -> dict:
    """What training a compiled `AIMPretrainer` on `images` does, inside
    `scope()` if given: its loss and gradients (computed directly), then
    the losses of `steps` optimizer steps and the weights after them."""
    import contextlib

    with (scope or contextlib.nullcontext)():
        loss, gradients = loss_and_gradients(model, images)
        losses = [float(model.train_on_batch(images)) for _ in range(steps)]
    return {
        "loss": loss,
        "gradients": dict(zip([v.path for v in model.trainable_variables], gradients)),
        "step_losses": losses,
        "weights": {w.path: to_numpy(w) for w in model.weights},
    }


def assert_same_training(expected: dict, got: dict, rtol=1e-5, atol=1e-6) -> None:
    """Two `training_record`s of the same model trained two ways (e.g. with
    and without remat, on one device or a mesh) agree: loss, every
    gradient, the loss of every step and the final weights. (A first AdamW
    step alone is about lr * sign(gradient) and would hide most errors.)"""
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=rtol)
    assert list(got["gradients"]) == list(expected["gradients"])
    for path, gradient in expected["gradients"].items():
        scale = float(np.abs(gradient).max()) or 1.0
        np.testing.assert_allclose(got["gradients"][path], gradient, rtol=rtol,
                                   atol=atol * scale, err_msg=path)
    np.testing.assert_allclose(got["step_losses"], expected["step_losses"], rtol=rtol)
    for path, weight in expected["weights"].items():
        np.testing.assert_allclose(got["weights"][path], weight, atol=1e-5, err_msg=path)


@pytest.fixture(autouse=True)
def _autograd_left_on():
    """In the PyTorch pass, a test that leaves autograd switched off fails
    itself (and autograd is switched back on): otherwise every later test in
    the same worker that trains would fail instead, far from the cause."""
    yield
    if keras.config.backend() != "torch":
        return
    import torch

    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left PyTorch's autograd switched off "
                    "(torch.set_grad_enabled(False) without restoring it)")
