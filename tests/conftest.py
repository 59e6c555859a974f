"""Shared fixtures: the tiny released-format AIM and its reference outputs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_aim  # noqa: E402

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
