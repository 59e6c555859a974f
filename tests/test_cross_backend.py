"""The same weights give the same outputs under JAX, TensorFlow and PyTorch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "tensorflow", "torch")

# Runs in a fresh interpreter per backend: loads the reference weights,
# computes outputs on the reference images and on a second, larger input.
SCRIPT = r"""
import sys, numpy as np, keras, keras_aim
from tests.conftest import fixture_path, make_tiny_classifier, to_numpy
classifier = make_tiny_classifier(image_shape=(None, None, 3))
keras_aim.load_official_weights(classifier, fixture_path("model.safetensors"))
images = np.load(fixture_path("images_nhwc.npy"))
larger = np.random.RandomState(0).randn(2, 48, 40, 3).astype("float32")
backbone = classifier.backbone
np.savez(
    sys.argv[1],
    logits=to_numpy(classifier(images)),
    tokens=to_numpy(backbone(images)),
    blocks=np.stack([to_numpy(b) for b in backbone.block_outputs(images)]),
    larger_tokens=to_numpy(backbone(larger)),
    larger_logits=to_numpy(classifier(larger)),
)
"""


@pytest.mark.slow
@pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="spawns all three backends itself; run once (in the JAX pass)",
)
def test_outputs_agree_across_backends(tmp_path):
    results = {}
    for backend in BACKENDS:
        out = tmp_path / f"{backend}.npz"
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        run = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, f"{backend}:\n{run.stderr[-3000:]}"
        results[backend] = dict(np.load(out))
    worst = {}
    for name in results["jax"]:
        for other in BACKENDS[1:]:
            diff = np.abs(results["jax"][name] - results[other][name]).max()
            worst[f"{name} jax-{other}"] = float(diff)
    assert max(worst.values()) <= 1e-5, json.dumps(worst, indent=1)
